"""A card that expires between a retry's plan or claim and its charge is not charged.

Found by review: compute plans a retry only on a card still valid on the retry's day, and the charge
re-checked that the claimed card was not detached, but never its expiry. A retry planned and claimed
on the last day of the card's expiry month and charged after midnight UTC (a queue backlog, a worker
picking the message up late, the read of the invoice at Stripe before the charge) went to Stripe on an
expired card: declined (expired_card, a permanent decline), a charge spent on the invoice's cap and the
card's for nothing, and the failure class turned permanent. Now the card is checked against the time of
the charge itself: an expired card is not charged, the retry is skipped and the account recomputed,
which plans no retry on that card (the way a retry planned on an expired card is handled).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from freezegun import freeze_time

from app.payments.pay import retry_payment
from app.payments.retries import claim_due
from app.payments.stripe_client import make_stripe_client
from tests.conftest import post_event, wait_for
from tests.integration.dunning_setup import dunning_row, retries
from tests.integration.test_retry_expired_default import attach_as_default
from tests.stripe_events import event, unique, with_product

pytestmark = pytest.mark.worker

DAY = 86400
# The card is valid through December 2026 (UTC): expired from this moment on.
EXPIRY = datetime(2027, 1, 1, tzinfo=UTC)


def _planned_on_a_card_expiring_tonight(client, engine, account: str, customer: str) -> tuple[str, str]:
    """(invoice, card): an invoice declined transiently two days ago on the customer's default card,
    valid through December; its retry, planned on that card, is due. Set up two hours before it expires."""
    with freeze_time(EXPIRY - timedelta(hours=2), tick=True):
        t = int((EXPIRY - timedelta(hours=2)).timestamp()) - 2 * DAY
        card = unique("pm")
        attach_as_default(client, customer, card, t - 30 * DAY, 12, 2026)
        invoice = unique("in")
        failed = event("invoice.payment_failed", id=invoice, customer=customer, created=t, amount_due=5000,
                       amount_remaining=5000, amount_paid=0, attempt_count=1, billing_reason="subscription_cycle",
                       paths={"created": t - DAY})
        assert post_event(client, with_product(failed, "prod_core", 5000)).status_code == 200
        charge = event("charge.failed", id=unique("ch"), customer=customer, payment_intent=unique("pi"),
                       payment_method=card, failure_code="card_declined", created=t + 1,
                       paths={"created": t + 1, "outcome.reason": "insufficient_funds"})
        assert post_event(client, charge).status_code == 200
        state = wait_for(lambda: (d := dunning_row(engine, account)).get("failure_class") == "transient" and d,
                         message="the decline recomputed")
        assert state["retry_payment_method_id"] == card and state["next_retry_at"] <= datetime.now(UTC), state
    return invoice, card


def test_a_retry_claimed_before_its_card_expired_and_run_after_is_not_charged(client, accounts, engine, worker,
                                                                              celery_app, fake_stripe):
    account, customer = accounts.create()
    invoice, card = _planned_on_a_card_expiring_tonight(client, engine, account, customer)
    with freeze_time(EXPIRY - timedelta(seconds=30)):
        (retry_id,) = claim_due(engine, datetime.now(UTC))  # the card is still valid

    # Its message is picked up a minute later, in January.
    reads: list[str] = []
    fake_stripe.on_invoice_read = reads.append
    with freeze_time(EXPIRY + timedelta(seconds=30), tick=True):
        result = celery_app.send_task("tasks.retry_payment", [retry_id]).get(timeout=20)
        assert result["outcome"] == "skipped" and "expired" in result["detail"], result
        assert fake_stripe.pay_requests(invoice) == []
        assert reads == []  # skipped at its claim: Stripe not even asked for the invoice before the charge
        assert [r["state"] for r in retries(engine, account)] == ["skipped"]
        # Recomputed: as for any retry planned on a card expired by its day, none is planned on it.
        state = wait_for(lambda: (d := dunning_row(engine, account))["next_retry_at"] is None and d,
                         message="recomputed after the skip")
    (none,) = [r for r in state["reasons"] if r["rule"] == "retry.none_no_method"]
    assert none["facts"]["expired"] == [card], state["reasons"]
    assert claim_due(engine, EXPIRY + timedelta(minutes=1)) == []
    assert fake_stripe.pay_requests() == []


def test_a_card_that_expires_while_the_retry_is_being_charged_is_not_charged(client, accounts, engine, worker,
                                                                            runtime, fake_stripe):
    account, customer = accounts.create()
    invoice, _card = _planned_on_a_card_expiring_tonight(client, engine, account, customer)
    stripe_client = make_stripe_client(runtime.settings)
    with freeze_time(EXPIRY - timedelta(seconds=2)) as frozen:
        (retry_id,) = claim_due(engine, datetime.now(UTC))
        # The task starts a second before midnight and claims the row (the card still valid); reading
        # the invoice at Stripe, before the charge, takes it past midnight.
        fake_stripe.on_invoice_read = lambda _invoice: frozen.move_to(EXPIRY + timedelta(seconds=1))
        result = retry_payment(engine, stripe_client, retry_id, EXPIRY - timedelta(seconds=1),
                               policy_version=runtime.policy.version)
    assert result.outcome == "skipped" and result.account_id == account, result
    assert "expired" in (result.detail or ""), result
    assert fake_stripe.pay_requests(invoice) == [] and fake_stripe.charges == []
    (row,) = retries(engine, account)
    assert row["state"] == "skipped" and "expired" in row["error"], row
