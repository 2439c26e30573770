"""/pay-bad-debt in Stripe's three-decimal currencies (bhd, jod, kwd, omr, tnd).

Stripe charges a card in those currencies only in amounts whose minor units end in 0 (its
currencies guide: round such amounts to the nearest ten); any other amount is a 400. The payment is
for exactly the balance and is never rounded, so a balance of 100.005 KWD cannot be paid by card here:
refused up front (409 ``amount_not_chargeable``), nothing stored, Stripe asked nothing, the account
still in bad debt. Before, every attempt stored a failed payment after Stripe's 400 (502
``payment_provider_error``) and the account went back to bad debt.
"""

from __future__ import annotations

import pytest

from tests.integration.bad_debt_setup import dunning_row, into_bad_debt, key, pay, payments


@pytest.mark.parametrize("currency, read", [("kwd", "100.005 KWD"), ("bhd", "100.005 BHD"), ("jod", "100.005 JOD"),
                                            ("omr", "100.005 OMR"), ("tnd", "100.005 TND")])
def test_a_three_decimal_balance_a_card_cannot_be_charged_is_refused_before_anything_is_stored_or_sent(
        client, engine, runtime, accounts, stripe_fake, currency, read):
    debt = into_bad_debt(client, engine, runtime, accounts, amount=100_005, currency=currency)
    stripe_fake.add_invoice(debt.invoice_object)
    idempotency_key = key()
    response = pay(client, {"account_id": debt.account, "amount": 100_005}, idempotency_key)
    assert (response.status_code, response.json["error"]) == (409, "amount_not_chargeable"), response.json
    reason = response.json["reason"]
    assert read in reason and "card" in reason and currency.upper() in reason
    assert "100005 " not in reason  # major units, never the integer read as such
    assert payments(engine, debt.account) == []
    assert stripe_fake.calls == []  # neither the invoices nor an intent asked for
    assert dunning_row(engine, debt.account)["status"] == "bad_debt"
    # Not kept under the key: the same request answers the same (nothing changed), and rounding is no way out.
    again = pay(client, {"account_id": debt.account, "amount": 100_005}, idempotency_key)
    assert (again.status_code, again.json["error"]) == (409, "amount_not_chargeable")
    rounded = pay(client, {"account_id": debt.account, "amount": 100_000}, key())
    assert (rounded.status_code, rounded.json["error"]) == (422, "amount_mismatch")
    assert payments(engine, debt.account) == [] and stripe_fake.calls == []


def test_a_three_decimal_balance_ending_in_zero_is_charged_as_it_is(client, engine, runtime, accounts, stripe_fake):
    debt = into_bad_debt(client, engine, runtime, accounts, amount=100_000, currency="kwd")
    stripe_fake.add_invoice(debt.invoice_object)
    response = pay(client, {"account_id": debt.account, "amount": 100_000}, key())
    assert response.status_code == 202, response.json
    [intent] = stripe_fake.intents_created()
    assert (intent.params["amount"], intent.params["currency"]) == ("100000", "kwd")


def test_a_two_decimal_balance_not_ending_in_zero_is_charged(client, engine, runtime, accounts, stripe_fake):
    debt = into_bad_debt(client, engine, runtime, accounts, amount=100_005, currency="usd")
    stripe_fake.add_invoice(debt.invoice_object)
    response = pay(client, {"account_id": debt.account, "amount": 100_005}, key())
    assert response.status_code == 202, response.json
    assert [c.params["amount"] for c in stripe_fake.intents_created()] == ["100005"]
