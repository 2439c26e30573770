"""Review (payments): which card POST /pay-bad-debt charges."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from tests.conftest import post_event
from tests.integration.bad_debt_setup import dunning_row, key, pay, payments, recompute
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


EXPIRED = {"card.exp_month": 1, "card.exp_year": 2020}  # valid through 31 January 2020 (UTC): long expired
VALID = {"card.exp_month": 12, "card.exp_year": 2040}


def _card(client, customer: str, card: str, ago: int, expiry: dict[str, int]) -> None:
    """payment_method.attached for ``card`` ``ago`` seconds ago, with its expiry: the mirror's card."""
    attached = event("payment_method.attached", id=card, customer=customer, created=int(time.time()) - ago,
                     paths=expiry)
    assert post_event(client, attached).status_code == 200


def test_a_default_card_the_mirror_knows_as_expired_is_not_charged_and_nothing_is_kept(client, engine, runtime,
                                                                                      debtor, stripe_fake):
    """The customer's only card, their default, expired: Stripe surely declines it (expired_card).
    Charging it spent the customer's attempt and put a decline on the network for nothing; it is
    refused as a customer with no card is, before Stripe is asked anything or the key is used."""
    _card(client, debtor.customer, debtor.payment_method, 40 * DAY, EXPIRED)
    assert recompute(engine, runtime, debtor.account)["status"] == "bad_debt"

    idempotency_key = key()
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, idempotency_key)
    assert (response.status_code, response.json.get("error")) == (409, "no_payment_method"), response.json
    reason = response.json["reason"]
    assert debtor.payment_method in reason and "expired" in reason and "01/2020" in reason
    assert stripe_fake.calls == []  # neither the invoices nor an intent asked for
    assert payments(engine, debtor.account) == []
    assert dunning_row(engine, debtor.account)["status"] == "bad_debt"

    # Nothing kept under the key: once the customer adds a valid card, the same request pays with it.
    new_card = unique("pm")
    _card(client, debtor.customer, new_card, 60, VALID)
    assert recompute(engine, runtime, debtor.account)["status"] == "bad_debt"
    again = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, idempotency_key)
    assert again.status_code == 202, again.json
    [call] = stripe_fake.intents_created()
    assert (call.params["customer"], call.params["payment_method"]) == (debtor.customer, new_card)


def test_an_expired_default_passes_to_the_customers_latest_valid_card(client, engine, runtime, debtor, stripe_fake):
    """As the retries do (README: a default card the mirror knows as expired is read as a detached
    one): the next usable card of the debt's customer, never an expired one, even the newest."""
    _card(client, debtor.customer, debtor.payment_method, 40 * DAY, EXPIRED)
    valid = unique("pm")
    _card(client, debtor.customer, valid, 20 * DAY, VALID)
    newest_expired = unique("pm")
    _card(client, debtor.customer, newest_expired, 10 * DAY, EXPIRED)
    assert recompute(engine, runtime, debtor.account)["status"] == "bad_debt"

    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert response.status_code == 202, response.json
    [call] = stripe_fake.intents_created()
    assert (call.params["customer"], call.params["payment_method"]) == (debtor.customer, valid)


def test_a_detached_default_passes_over_an_expired_card_to_a_valid_one(client, engine, runtime, debtor, stripe_fake):
    """Several cards and the default removed: the latest attached card was charged even when the
    mirror knew it expired, while an older valid card was on file."""
    _card(client, debtor.customer, debtor.payment_method, 40 * DAY, VALID)
    valid = unique("pm")
    _card(client, debtor.customer, valid, 30 * DAY, VALID)
    expired = unique("pm")
    _card(client, debtor.customer, expired, 20 * DAY, EXPIRED)
    removed = event("payment_method.attached", id=debtor.payment_method, customer=None,
                    created=int(time.time()) - 50)
    removed["type"] = "payment_method.detached"  # the fixtures hold no detached envelope: same object, customer null
    assert post_event(client, removed).status_code == 200
    assert recompute(engine, runtime, debtor.account)["status"] == "bad_debt"

    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert response.status_code == 202, response.json
    [call] = stripe_fake.intents_created()
    assert (call.params["customer"], call.params["payment_method"]) == (debtor.customer, valid)


def test_a_card_is_charged_through_the_last_day_of_its_expiry_month(client, engine, runtime, debtor, stripe_fake):
    """A card is valid through the last day of its expiry month (UTC): this month's is charged."""
    today = datetime.now(UTC)
    _card(client, debtor.customer, debtor.payment_method, 40 * DAY,
          {"card.exp_month": today.month, "card.exp_year": today.year})
    assert recompute(engine, runtime, debtor.account)["status"] == "bad_debt"

    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert response.status_code == 202, response.json
    [call] = stripe_fake.intents_created()
    assert call.params["payment_method"] == debtor.payment_method
