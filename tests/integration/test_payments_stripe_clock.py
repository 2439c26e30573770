"""A retry's claim is compared with what Stripe did after it by what the mirror held at the claim, never
by our hosts' clocks against Stripe's.

Found by a clock audit: the worker stopped a dispatched retry when the invoice's latest attempt
(``stripe_payment_attempt.attempted_at``, Stripe's clock) was later than the claim
(``payment_retry.created_at``, beat's clock), and a free retry when the customer's default card changed
(``stripe_customer_state.changed_at``, Stripe's clock) at or after the claim's second. No skew rule
relates the two clocks (MAX_CLOCK_LEAD is between our own hosts). On a beat host 90 s ahead of Stripe,
the customer paying on the hosted page 30 s after the claim was timed a minute "before" it: the retry
charged the invoice right after that payment; a default card changed 30 s after the claim let the free
retry charge the card the customer had just replaced. The claim now records the latest attempt and
default-card change the mirror held (Stripe's times), and the worker compares the mirror's times with
those: Stripe's clock with Stripe's clock.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from celery import Celery
from freezegun import freeze_time

from app.payments.retries import claim_due
from app.recompute.gather import gather
from app.recompute.service import run_recompute
from tests.conftest import Accounts, post_event
from tests.integration.dunning_setup import dunning_row, method_attached, retries
from tests.integration.test_outbox_cancellation_body import declined_charge, failed_invoice
from tests.stripe_events import event, unique

DAY = 86400
BEAT_AHEAD = timedelta(seconds=90)  # beat's (and the worker's) clock ahead of Stripe's


def retry_on_a_host(celery_app: Celery, retry_id: int) -> dict:
    import tasks.payments  # noqa: F401  registers the task

    return celery_app.tasks["tasks.retry_payment"].apply(args=[retry_id], throw=True).get()


def failed_a_day_ago(client, accounts: Accounts, due_in: timedelta) -> tuple[str, str, str, datetime]:
    """An invoice whose payment failed transiently almost a day ago on card_old: its first retry falls
    due ``due_in`` from now. (account, customer, invoice, the retry's due time)."""
    account, customer = accounts.create()
    failed_at = int(time.time() - DAY + due_in.total_seconds())
    invoice = unique("in")
    assert post_event(client, failed_invoice(customer, invoice, failed_at)).status_code == 200
    assert post_event(client, declined_charge(customer, failed_at, "insufficient_funds")).status_code == 200
    return account, customer, invoice, datetime.fromtimestamp(failed_at, UTC) + timedelta(days=1)


def test_a_payment_stripe_takes_just_after_the_claim_stops_the_retry_on_a_host_ahead_of_stripe(
        client, accounts, engine, runtime, celery_app: Celery, fake_stripe):
    """Beat claims the retry at 12:01:00 by its clock (11:59:30 at Stripe); the customer pays on the
    hosted page 30 s later (12:00:00 by Stripe's clock), and the worker picks the retry up with the
    invoice's payment mirrored but not yet its invoice.paid: not charged again."""
    account, _, invoice, due = failed_a_day_ago(client, accounts, timedelta(minutes=10))
    run_recompute(engine, runtime.policy, account, "STATE_REFRESH", datetime.now(UTC))
    assert dunning_row(engine, account)["next_retry_at"] == due
    claimed_at = due + timedelta(minutes=1)
    (retry_id,) = claim_due(engine, claimed_at)

    paid_at = int((claimed_at - BEAT_AHEAD + timedelta(seconds=30)).timestamp())
    payment = event("invoice_payment.paid", id=unique("inpay"), invoice=invoice, amount_paid=5000,
                    amount_requested=5000, created=paid_at,
                    paths={"payment.payment_intent": unique("pi"), "created": paid_at})
    with freeze_time(datetime.fromtimestamp(paid_at, UTC)):
        assert post_event(client, payment).status_code == 200

    with freeze_time(claimed_at + timedelta(seconds=40), tick=True):
        result = retry_on_a_host(celery_app, retry_id)

    assert result["outcome"] == "skipped" and "newer payment attempt" in result["detail"], result
    assert fake_stripe.pay_requests(invoice) == []
    assert [r["state"] for r in retries(engine, account)] == ["skipped"]


def test_a_default_card_changed_just_after_the_claim_stops_the_free_retry_on_a_host_ahead_of_stripe(
        client, accounts, engine, runtime, celery_app: Celery, fake_stripe):
    """A free retry on a card the customer added (not their default); beat claims it, and 30 s later by
    Stripe's clock (a minute "before" the claim by beat's) the customer makes another card the default:
    the card just replaced is not charged."""
    account, customer, invoice, _ = failed_a_day_ago(client, accounts, -timedelta(hours=2))
    added_at = int(time.time()) - 600
    card = method_attached(client, customer, added_at)
    run_recompute(engine, runtime.policy, account, "STATE_REFRESH", datetime.now(UTC))
    stored = dunning_row(engine, account)
    assert stored["retry_free"] and stored["retry_payment_method_id"] == card, stored
    claimed_at = stored["next_retry_at"] + timedelta(minutes=1)
    (retry_id,) = claim_due(engine, claimed_at)
    # The claim holds the card's change as the mirror had it (Stripe's clock), and compute reads it
    # (test_retry_tried_since_stripe_clock.py).
    (row,) = retries(engine, account)
    assert row["method_change_seen_at"] == datetime.fromtimestamp(added_at, UTC), row
    with engine.connect() as conn:
        gathered = gather(conn, account)
    assert gathered is not None
    assert [r.method_change_seen_at for r in gathered[0].retries] == [row["method_change_seen_at"]]

    changed_at = int((claimed_at - BEAT_AHEAD + timedelta(seconds=30)).timestamp())
    other = unique("pm")
    default = event("customer.updated", id=customer, created=changed_at,
                    paths={"invoice_settings.default_payment_method": other})
    default["data"]["previous_attributes"] = {"invoice_settings": {"default_payment_method": None}}
    with freeze_time(datetime.fromtimestamp(changed_at, UTC)):
        assert post_event(client, default).status_code == 200

    with freeze_time(claimed_at + timedelta(seconds=40), tick=True):
        result = retry_on_a_host(celery_app, retry_id)

    assert result["outcome"] == "skipped" and "default payment method is another" in result["detail"], result
    assert fake_stripe.pay_requests(invoice) == []
