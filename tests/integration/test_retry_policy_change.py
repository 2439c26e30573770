"""A retry planned under a policy file that is no longer in force is not charged before compute has
planned it under the one in force.

Found by review: the stored decision (subs_dunning.next_retry_at) is dispatched as it is when due, and
retry_payment re-checked the invoice, the card and that the decision still planned it, but not which
policy made that decision. After a deploy with a new policy file (a shorter schedule, a lower cap on
charges, no free retry on a new card) every account's planned retry was charged under the old one until
some event recomputed the account. Now the row is skipped unsent, the account recomputed under the
policy in force, and the same attempt, planned again, is re-armed under its key and charged once.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from app.payments.retries import claim_due
from tests.conftest import wait_for
from tests.integration.dunning_setup import dunning_row, failed_invoice, retries

pytestmark = pytest.mark.worker

OLD_POLICY = "2026-06-01.1"


def test_a_retry_planned_under_another_policy_is_not_charged_until_compute_plans_it_again(
        client, accounts, engine, worker, celery_app, runtime, fake_stripe):
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    assert dunning_row(engine, account)["policy_version"] == runtime.policy.version
    # The decision was made by the fleet's previous policy file (the deploy changed it since).
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE subs_dunning SET policy_version = %(v)s WHERE account_id = %(a)s",
                             {"v": OLD_POLICY, "a": account})
    (retry_id,) = claim_due(engine, datetime.now(UTC))

    result = celery_app.send_task("tasks.retry_payment", [retry_id]).get(timeout=20)
    assert result["outcome"] == "skipped" and OLD_POLICY in result["detail"], result
    assert fake_stripe.pay_requests(invoice) == []
    assert [r["state"] for r in retries(engine, account)] == ["skipped"]

    # Recomputed under the policy in force, which plans the same attempt: re-armed under its key, charged once.
    state = wait_for(lambda: (s := dunning_row(engine, account))["policy_version"] == runtime.policy.version and s,
                     message="recomputed under the policy in force")
    assert state["retry_invoice_id"] == invoice and state["next_retry_at"] is not None
    assert claim_due(engine, datetime.now(UTC)) == [retry_id]
    done = celery_app.send_task("tasks.retry_payment", [retry_id]).get(timeout=20)
    assert done["outcome"] == "sent", done
    (request,) = fake_stripe.pay_requests(invoice)
    assert request.idempotency_key == retries(engine, account)[0]["idempotency_key"]
