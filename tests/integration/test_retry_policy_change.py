"""A retry planned under a policy file that is no longer in force is not charged before the policy in
force plans that same attempt.

Found by review: the stored decision (subs_dunning.next_retry_at) is dispatched as it is when due, and
retry_payment re-checked the invoice, the card and that the decision still planned it, but not which
policy made that decision. After a deploy with a new policy file (a shorter schedule, a lower cap on
charges, no free retry on a new card) every account's planned retry was charged under the old one until
some event recomputed the account. Now a row planned under another policy version is charged only when
the worker's own policy plans that very attempt (same invoice, due time, card and kind); otherwise it is
skipped unsent, the account recomputed under the policy in force, and the attempt that policy plans is
claimed under its own key and charged once.

Found by review next: that check skipped every retry planned under another version, so during a rolling
deploy an old worker skipped the retries the new workers had planned and the other way round, each skip
re-planned by whichever worker recomputed the account, and retries waited until all workers agreed, even
when both policy files plan the same attempt (a new file that changes only the consequences, say).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from app.payments.retries import claim_due
from tests.conftest import wait_for
from tests.integration.dunning_setup import dunning_row, failed_invoice, method_attached, retries

pytestmark = pytest.mark.worker

OTHER_POLICY = "2027-01-15.1"


def test_a_retry_planned_under_another_policy_is_not_charged_until_the_policy_in_force_plans_it(
        client, accounts, engine, worker, celery_app, runtime, fake_stripe, monkeypatch):
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=3)
    planned = dunning_row(engine, account)
    assert planned["policy_version"] == runtime.policy.version and planned["next_retry_at"] <= datetime.now(UTC)
    # The deploy's new policy file retries transient failures from day 2, not day 1: the fleet's workers
    # run it now, and the account's decision (day 1) was made under the previous one.
    old_version = runtime.policy.version
    monkeypatch.setattr(runtime, "policy", replace(runtime.policy, version=OTHER_POLICY,
                                                   transient_schedule_days=(2, 4, 6, 8, 10, 14)))
    (retry_id,) = claim_due(engine, datetime.now(UTC))

    result = celery_app.send_task("tasks.retry_payment", [retry_id]).get(timeout=20)
    assert result["outcome"] == "skipped" and old_version in result["detail"], result
    assert fake_stripe.pay_requests(invoice) == []
    assert [r["state"] for r in retries(engine, account)] == ["skipped"]

    # Recomputed under the policy in force, which plans day 2: claimed under that attempt's key, charged once.
    state = wait_for(lambda: (s := dunning_row(engine, account))["policy_version"] == OTHER_POLICY and s,
                     message="recomputed under the policy in force")
    assert state["retry_invoice_id"] == invoice
    assert state["next_retry_at"] - planned["next_retry_at"] == timedelta(days=1), (state, planned)
    (new_id,) = claim_due(engine, datetime.now(UTC))
    assert new_id != retry_id
    done = celery_app.send_task("tasks.retry_payment", [new_id]).get(timeout=20)
    assert done["outcome"] == "sent", done
    (request,) = fake_stripe.pay_requests(invoice)
    assert request.idempotency_key == f"retry:{invoice}:{int(state['next_retry_at'].timestamp())}"
    assert [r["state"] for r in retries(engine, account)] == ["skipped", "sent"]


@pytest.mark.parametrize("newer", ["worker", "decision"])
def test_during_a_rolling_deploy_a_retry_both_policies_plan_alike_is_charged_at_once(
        client, accounts, engine, worker, celery_app, runtime, fake_stripe, monkeypatch, newer):
    """Two policy files at once that plan this retry alike: the worker charges the decision of the other
    version (a new worker an old decision, or an old worker a new one) instead of skipping it."""
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    if newer == "worker":  # the new file changes what no retry depends on (the consequences, say)
        monkeypatch.setattr(runtime, "policy", replace(runtime.policy, version=OTHER_POLICY))
    else:  # a new worker made the decision; this one still runs the previous file
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE subs_dunning SET policy_version = %(v)s WHERE account_id = %(a)s",
                                 {"v": OTHER_POLICY, "a": account})
    assert dunning_row(engine, account)["policy_version"] != runtime.policy.version
    (retry_id,) = claim_due(engine, datetime.now(UTC))

    result = celery_app.send_task("tasks.retry_payment", [retry_id]).get(timeout=20)
    assert result["outcome"] == "sent", result
    (request,) = fake_stripe.pay_requests(invoice)
    (row,) = retries(engine, account)
    assert row["state"] == "sent" and request.idempotency_key == row["idempotency_key"]


@pytest.mark.parametrize("immediate", [True, False])
def test_a_free_retry_planned_under_another_policy_is_charged_only_if_the_policy_in_force_gives_it(
        client, accounts, engine, worker, celery_app, runtime, fake_stripe, monkeypatch, immediate):
    """A new card's free retry, planned under the previous file: charged at once when the file in force
    gives a new card its free retry too; skipped unsent, and not given, when it does not."""
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "expired_card", days_ago=2)
    version = dunning_row(engine, account)["version"]
    pm = method_attached(client, customer)
    state = wait_for(lambda: (d := dunning_row(engine, account))["version"] > version and d, message="new method")
    assert state["retry_free"] is True and state["retry_payment_method_id"] == pm
    monkeypatch.setattr(runtime, "policy", replace(runtime.policy, version=OTHER_POLICY,
                                                   immediate_retry_on_new_method=immediate))
    (retry_id,) = claim_due(engine, datetime.now(UTC))

    result = celery_app.send_task("tasks.retry_payment", [retry_id]).get(timeout=20)
    if immediate:
        assert result["outcome"] == "sent", result
        (request,) = fake_stripe.pay_requests(invoice)
        assert request.params["payment_method"] == [pm] and request.idempotency_key.startswith(f"free:{invoice}:{pm}:")
        return
    assert result["outcome"] == "skipped" and "which plans another retry" in result["detail"], result
    assert fake_stripe.pay_requests(invoice) == []
    replanned = wait_for(lambda: (s := dunning_row(engine, account))["policy_version"] == OTHER_POLICY and s,
                         message="recomputed under the policy in force")
    assert replanned["next_retry_at"] is None and not replanned["retry_free"], replanned
