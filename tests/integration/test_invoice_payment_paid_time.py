"""invoice_payment.paid times the payment by when it was paid (its status_transitions.paid_at, else
the event), not by when the invoice payment object was created: Stripe creates an invoice's default
invoice payment when it finalizes the invoice, days or weeks before the customer pays it. End to end
from the signed webhooks (mirror -> gather -> compute -> GET /accounts/<id>/dunning)."""

from __future__ import annotations

import time

import pytest

from tests.conftest import Accounts, post_event
from tests.integration.journey_views import decided, rules
from tests.stripe_events import event, unique, with_product

DAY = 86400
AMOUNT = 5000


@pytest.mark.parametrize("paid_at_known", [True, False])
def test_a_payment_linked_before_the_invoice_is_paid_holds_bad_debt(client, engine, runtime, accounts: Accounts,
                                                                    paid_at_known: bool):
    """An invoice finalized 30 days ago, its payment declined then, marked uncollectible: bad debt,
    and the customer pays it on the hosted page (its own payment intent, confirmed again) before the
    account's recompute runs; invoice_payment.paid is delivered, invoice.paid and the intent's events
    not yet. The payment is in flight: bad debt waits for invoice.paid (compute's payment-flow
    guard). Timed by the invoice payment's creation (the finalization), the success looked 30 days
    old: bad debt was entered and the subscription's cancellation requested for a customer who had
    just paid. Without paid_at (null in the fixture), the event's time."""
    account, customer = accounts.create()
    now = int(time.time())
    invoice, intent, finalized = unique("in"), unique("pi"), now - 30 * DAY - 3600
    failed = event("invoice.payment_failed", id=invoice, customer=customer, created=now - 30 * DAY,
                   amount_due=AMOUNT, amount_remaining=AMOUNT, amount_paid=0, attempt_count=1,
                   billing_reason="subscription_cycle", paths={"created": finalized})
    assert post_event(client, with_product(failed, "prod_core", AMOUNT)).status_code == 200
    declined = event("charge.failed", id=unique("ch"), customer=customer, payment_intent=intent,
                     failure_code="card_declined", amount=AMOUNT, created=now - 30 * DAY + 1,
                     paths={"created": now - 30 * DAY + 1, "outcome.reason": "insufficient_funds"})
    assert post_event(client, declined).status_code == 200
    marked = event("invoice.marked_uncollectible", id=invoice, customer=customer, created=now - 120,
                   amount_due=AMOUNT, amount_remaining=AMOUNT, amount_paid=0, attempt_count=4,
                   billing_reason="subscription_cycle", status="uncollectible",
                   paths={"created": finalized, "status_transitions.marked_uncollectible_at": now - 120})
    assert post_event(client, with_product(marked, "prod_core", AMOUNT)).status_code == 200

    paid_now = now - 60
    link = event("invoice_payment.paid", id=unique("inpay"), invoice=invoice, amount_paid=AMOUNT,
                 amount_requested=AMOUNT, created=paid_now,
                 paths={"payment.payment_intent": intent, "created": finalized,
                        "status_transitions.paid_at": paid_now if paid_at_known else None})
    assert post_event(client, link).status_code == 200
    state = decided(client, engine, runtime, account)
    assert "guard.payment_in_flight" in rules(state), rules(state)
    assert state["status"] != "bad_debt" and not state["bad_debt"]
