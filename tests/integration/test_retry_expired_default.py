"""A retry planned on the failed card because the customer's default card is expired is charged, not
skipped at every claim.

Found by review: compute passes over a default card the mirror knows as expired (Stripe would decline
it) and plans the schedule on the card that failed, but retry_payment skipped any claim on a card
other than the customer's default unless the mirror knew the default as detached: the retry was
skipped, the account recomputed to the same plan, the attempt re-armed under its key by the next
dispatch and skipped again, every tick, and never charged.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from app.payments.retries import claim_due
from tests.conftest import post_event, wait_for
from tests.integration.dunning_setup import dunning_row, retries
from tests.stripe_events import event, unique, with_product

pytestmark = pytest.mark.worker

DAY = 86400


def attach_as_default(client, customer: str, card: str, created: int, exp_month: int, exp_year: int) -> None:
    """The card attached to the customer and made its default (invoice_settings), at ``created``."""
    attached = event("payment_method.attached", id=card, customer=customer, created=created,
                     paths={"card.exp_month": exp_month, "card.exp_year": exp_year})
    assert post_event(client, attached).status_code == 200
    default = event("customer.updated", id=customer, created=created,
                    paths={"invoice_settings.default_payment_method": card})
    default["data"]["previous_attributes"] = {"invoice_settings": {"default_payment_method": None}}
    assert post_event(client, default).status_code == 200


def test_a_retry_on_the_failed_card_beside_an_expired_default_is_charged(client, accounts, engine, worker,
                                                                          celery_app, fake_stripe):
    account, customer = accounts.create()
    t = int(time.time()) - 2 * DAY
    # The customer's default since a month ago: a card that expired in 2024.
    old_card = unique("pm")
    attach_as_default(client, customer, old_card, t - 30 * DAY, 4, 2024)
    # The renewal was declined (insufficient funds) on another card, valid.
    card = unique("pm")
    invoice = unique("in")
    failed = event("invoice.payment_failed", id=invoice, customer=customer, created=t, amount_due=5000,
                   amount_remaining=5000, amount_paid=0, attempt_count=1, billing_reason="subscription_cycle",
                   paths={"created": t - DAY})
    assert post_event(client, with_product(failed, "prod_core", 5000)).status_code == 200
    charge = event("charge.failed", id=unique("ch"), customer=customer, payment_intent=unique("pi"),
                   payment_method=card, failure_code="card_declined", created=t + 1,
                   paths={"created": t + 1, "outcome.reason": "insufficient_funds"})
    assert post_event(client, charge).status_code == 200
    state = wait_for(lambda: (d := dunning_row(engine, account)).get("retry_payment_method_id") == card and d,
                     message="retry planned on the failed card")
    assert state["next_retry_at"] <= datetime.now(UTC) and not state["retry_free"]

    (retry_id,) = claim_due(engine, datetime.now(UTC))
    done = celery_app.send_task("tasks.retry_payment", [retry_id]).get(timeout=20)
    assert done["outcome"] == "sent", done
    (request,) = fake_stripe.pay_requests(invoice)
    assert request.params["payment_method"] == [card]
    assert [r["state"] for r in retries(engine, account)] == ["sent"]
