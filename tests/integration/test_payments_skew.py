"""Clock skew between hosts never makes a payment path judge an account at a moment older than its
stored decision (test_recompute_skew.py): the retry's claim and the bad-debt quote decide at the moment
a recompute of the account would, the later of their host's clock and the stored decision's time
(subs_dunning.changed_at, at most MAX_CLOCK_LEAD ahead), and a retry's claim never before the dispatch
that claimed it (payment_retry.created_at, by beat's clock).

Found by review: the worker charging a retry re-checked that the stored decision still plans it, and
that the policy in force plans the same attempt, at its own clock. On a worker whose clock ran a few
minutes behind the host that planned the retry due (or behind beat's, which claimed it), the retry was
"not due" there: skipped unsent, the account recomputed, the same attempt re-armed by the next dispatch
and skipped again, until the worker's clock caught up. /pay-bad-debt quoted the debt at the web host's
clock: behind the host that put the account in bad debt at the 21-day boundary, its own decision was
no bad debt and the customer was told the balance was being recomputed (409) with nothing on its way.
An invoice a payment path reads at Stripe and mirrors itself is timed by Stripe's clock, not its host's.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from celery import Celery
from freezegun import freeze_time
from sqlalchemy import Engine

from app.domain.snapshot import MAX_CLOCK_LEAD
from app.payments.retries import claim_due
from app.recompute.service import run_recompute
from app.runtime import Runtime
from tests.conftest import Accounts, post_event
from tests.integration.bad_debt_setup import key, pay, payments
from tests.integration.dunning_setup import dunning_row, retries
from tests.integration.test_outbox_cancellation_body import declined_charge, failed_invoice
from tests.stripe_events import event, resource, unique, with_product

DAY = 86400
AHEAD = timedelta(minutes=4)  # the deciding host's lead: skew, within MAX_CLOCK_LEAD
OTHER_POLICY = "2027-01-15.1"


def retry_on_a_host(celery_app: Celery, retry_id: int) -> dict:
    """tasks.retry_payment as a worker host runs it: its clock is the (frozen) wall clock."""
    import tasks.payments  # noqa: F401  registers the task

    return celery_app.tasks["tasks.retry_payment"].apply(args=[retry_id], throw=True).get()


def failed_before(client, accounts: Accounts, due_in: timedelta) -> tuple[str, str, datetime]:
    """An account whose invoice failed transiently almost a day before the (frozen) wall clock: its first
    retry (day 1) falls due ``due_in`` from it. (account, invoice, the retry's due time)."""
    account, customer = accounts.create()
    failed_at = int(time.time() - DAY + due_in.total_seconds())
    invoice = unique("in")
    assert post_event(client, failed_invoice(customer, invoice, failed_at)).status_code == 200
    assert post_event(client, declined_charge(customer, failed_at, "insufficient_funds")).status_code == 200
    return account, invoice, datetime.fromtimestamp(failed_at, UTC) + timedelta(days=1)


def decided_and_claimed(client, accounts: Accounts, engine: Engine, runtime: Runtime
                        ) -> tuple[str, str, datetime, int]:
    """Host A is the first to decide about the account (the failure's webhooks and its recompute, all at
    one moment of A's clock), a minute after its retry fell due; beat, its clock like A's, claims the
    retry. (account, invoice, the decision's time, the claimed retry)."""
    decided_at = datetime.now(UTC).replace(microsecond=0)
    with freeze_time(decided_at):
        account, invoice, due = failed_before(client, accounts, -timedelta(minutes=1))
        run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED")
        (retry_id,) = claim_due(engine, datetime.now(UTC))
    stored = dunning_row(engine, account)
    assert stored["next_retry_at"] == due and stored["changed_at"] == decided_at, (stored, due, decided_at)
    return account, invoice, decided_at, retry_id


@pytest.mark.parametrize("policy_in_force", ["same", "another version planning alike"])
def test_a_worker_behind_the_host_that_planned_a_retry_due_charges_it(
        client, accounts, engine, runtime, celery_app, fake_stripe, monkeypatch, policy_in_force):
    """The worker's clock reads 3 minutes before the retry's due time, 4 behind the decision's: the
    decision (and the policy in force, asked when the decision was made under another) plans it due."""
    account, invoice, decided_at, retry_id = decided_and_claimed(client, accounts, engine, runtime)
    if policy_in_force != "same":  # a new policy file that plans retries alike (plans_same_attempt)
        monkeypatch.setattr(runtime, "policy", replace(runtime.policy, version=OTHER_POLICY))

    with freeze_time(decided_at - AHEAD, tick=True):
        result = retry_on_a_host(celery_app, retry_id)

    assert result["outcome"] == "sent", result
    (request,) = fake_stripe.pay_requests(invoice)
    (row,) = retries(engine, account)
    assert row["state"] == "sent" and request.idempotency_key == row["idempotency_key"]


def test_a_worker_behind_the_dispatcher_that_claimed_a_retry_charges_it(
        client, accounts, engine, runtime, celery_app, fake_stripe):
    """The decision was made long before the retry fell due; beat claimed it a minute after, and the
    worker's clock reads 4 minutes behind beat's: never judged before the claim, it is due."""
    account, invoice, due = failed_before(client, accounts, timedelta(minutes=10))
    run_recompute(engine, runtime.policy, account, "STATE_REFRESH", datetime.now(UTC))
    assert dunning_row(engine, account)["next_retry_at"] == due
    claimed_at = due + timedelta(minutes=1)
    (retry_id,) = claim_due(engine, claimed_at)

    with freeze_time(claimed_at - AHEAD, tick=True):
        result = retry_on_a_host(celery_app, retry_id)

    assert result["outcome"] == "sent", result
    assert len(fake_stripe.pay_requests(invoice)) == 1
    assert [r["state"] for r in retries(engine, account)] == ["sent"]


def test_a_retry_planned_by_a_clock_far_ahead_is_judged_by_the_workers_clock(
        client, accounts, engine, runtime, celery_app, fake_stripe):
    """Beyond MAX_CLOCK_LEAD the deciding host's clock was broken, not skewed: the worker's own clock
    judges, and a retry due an hour from now by it is not charged."""
    account, invoice, broken, retry_id = decided_and_claimed(client, accounts, engine, runtime)

    with freeze_time(broken - MAX_CLOCK_LEAD - timedelta(hours=1), tick=True):
        result = retry_on_a_host(celery_app, retry_id)

    assert result["outcome"] == "skipped" and "no longer plans" in result["detail"], result
    assert fake_stripe.pay_requests(invoice) == []
    assert [r["state"] for r in retries(engine, account)] == ["skipped"]


def test_a_web_host_behind_the_host_that_put_the_account_in_bad_debt_quotes_its_debt(
        client, accounts, engine, runtime, stripe_fake):
    """Host A put the account in bad debt a second past the 21-day boundary (its card declined as
    expired, so no retries: run out). /pay-bad-debt on a web host 4 minutes behind A quotes the same
    debt and takes the payment, where its own clock alone saw no bad debt yet (409, "being recomputed")."""
    account, customer = accounts.create()
    invoice, t0 = unique("in"), int(time.time()) - 20 * DAY
    on_file = event("customer.updated", id=customer, created=t0 - DAY,
                    paths={"invoice_settings.default_payment_method": "card_old"})
    assert post_event(client, on_file).status_code == 200
    failed = failed_invoice(customer, invoice, t0)
    assert post_event(client, failed).status_code == 200
    assert post_event(client, declined_charge(customer, t0 + 1, "expired_card")).status_code == 200
    first = run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED", datetime.now(UTC))
    assert first.decision is not None and first.decision.state.unpaid_since is not None
    decided_at = first.decision.state.unpaid_since + timedelta(days=21, seconds=1)
    entered = run_recompute(engine, runtime.policy, account, "STATE_REFRESH", decided_at)
    assert entered.decision is not None and entered.decision.state.status == "bad_debt", entered.summary()
    stripe_fake.add_invoice(failed["data"]["object"])

    with freeze_time(decided_at - AHEAD, tick=True):
        response = pay(client, {"account_id": account, "amount": 5000}, key())

    assert response.status_code == 202, response.json
    (payment,) = payments(engine, account)
    assert payment["state"] == "pending" and payment["amount"] == 5000 and payment["invoice_ids"] == [invoice]
    [call] = stripe_fake.intents_created()
    assert call.params["amount"] == "5000" and call.params["payment_method"] == "card_old"


def customer_of(engine: Engine, account: str) -> str:
    with engine.connect() as conn:
        return str(conn.exec_driver_sql("SELECT stripe_customer_id FROM subs_customer WHERE account_id = %(a)s",
                                        {"a": account}).scalar_one())


def invoice_row(engine: Engine, invoice: str) -> tuple[str, int]:
    with engine.connect() as conn:
        status, created = conn.exec_driver_sql("SELECT status, source_created FROM stripe_invoice WHERE id = %(i)s",
                                               {"i": invoice}).one()
    return status, int(created)


def test_an_invoice_a_worker_ahead_mirrors_from_stripe_is_timed_by_stripe_not_by_the_worker(
        client, accounts, engine, runtime, celery_app, fake_stripe):
    """A retry finds its invoice marked uncollectible at Stripe before the webhook came, and mirrors it
    as Stripe has it. Stamped with its worker's clock, 4 minutes ahead of Stripe's, the row outranked
    every event Stripe sent about the invoice in those 4 minutes: the customer's payment a minute later
    (invoice.paid) was taken for an older event and dropped, the account left in dunning though paid.
    Stamped with Stripe's own time of the change (status_transitions), the payment is mirrored."""
    account, invoice, _ = failed_before(client, accounts, -timedelta(minutes=1))
    customer = customer_of(engine, account)
    run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED", datetime.now(UTC))
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    marked = int(time.time())
    at_stripe = resource("invoice")
    at_stripe.update(id=invoice, customer=customer, status="uncollectible", amount_due=5000, amount_paid=0,
                     amount_remaining=5000)
    at_stripe["status_transitions"]["marked_uncollectible_at"] = marked
    fake_stripe.invoices[invoice] = at_stripe

    with freeze_time(datetime.fromtimestamp(marked, UTC) + AHEAD, tick=True):
        result = retry_on_a_host(celery_app, retry_id)
    assert result["outcome"] == "skipped" and "uncollectible" in result["detail"], result
    assert invoice_row(engine, invoice)[0] == "uncollectible"

    paid = event("invoice.paid", id=invoice, customer=customer, created=marked + 60, amount_due=5000,
                 amount_remaining=0, amount_paid=5000)
    assert post_event(client, with_product(paid, "prod_core", 5000)).status_code == 200
    assert invoice_row(engine, invoice) == ("paid", marked + 60)
    after = run_recompute(engine, runtime.policy, account, "STATE_REFRESH", datetime.now(UTC))
    assert after.decision is not None and after.decision.state.status == "current", after.summary()
