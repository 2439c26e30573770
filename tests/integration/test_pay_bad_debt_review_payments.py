"""Review (payments): which card POST /pay-bad-debt charges."""

from __future__ import annotations

import time

from tests.conftest import post_event
from tests.integration.bad_debt_setup import key, pay, recompute
from tests.stripe_events import event, unique

DAY = 86400


def test_a_default_card_the_mirror_knows_as_detached_is_not_charged(client, engine, runtime, debtor, stripe_fake):
    """The customer removed their default card and added another on the billing portal, then paid
    the debt at once: payment_method.detached and .attached are in, the customer.updated in which
    Stripe clears (or moves) the default is not yet (events come in no set order). Stripe refuses to
    charge a method detached from the customer, so the payment failed (502) while a card that can
    pay was on file; the retries already pass over a default known as detached (retry_cadence)."""
    now = int(time.time())
    old_card = event("payment_method.attached", id=debtor.payment_method, customer=debtor.customer,
                     created=now - 40 * DAY)
    assert post_event(client, old_card).status_code == 200
    new_card = unique("pm")
    added = event("payment_method.attached", id=new_card, customer=debtor.customer, created=now - 60)
    assert post_event(client, added).status_code == 200
    removed = event("payment_method.attached", id=debtor.payment_method, customer=None, created=now - 50)
    removed["type"] = "payment_method.detached"  # the fixtures hold no detached envelope: same object, customer null
    assert post_event(client, removed).status_code == 200
    assert recompute(engine, runtime, debtor.account)["status"] == "bad_debt"

    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert response.status_code == 202, response.json
    [call] = stripe_fake.intents_created()
    assert (call.params["customer"], call.params["payment_method"]) == (debtor.customer, new_card)
