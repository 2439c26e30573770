"""A bad-debt payment's intent found by its metadata only must be for the payment's own amount in its
own currency before its outcome counts (DESIGN 7: the payment is for the outstanding balance).

The payment's create answered a server error, so its intent id is not known: the webhook finds the
payment by the metadata the intent names (bad_debt_payment_id, account_id, the customer). An intent
naming the payment for the same integer in another currency (100000 JPY is about 650 USD, not the
1000.00 USD owed) or for another amount is not this payment's charge: its success must not pay the
debt's invoices out of band, and its failure must not end the payment in flight. The reconciliation
with Stripe refuses such an intent for an operator already (test_bad_debt_amounts_read.py); the
webhook took it as the payment's outcome."""

from __future__ import annotations

from typing import Any

import pytest

from app.payments.bad_debt_settle import settle
from tests.conftest import post_event
from tests.integration.bad_debt_setup import InBadDebt, intent_event, into_bad_debt, key, pay, payments, recompute

DEBT = 100_000  # 1000.00 USD


def _paid_behind_a_server_error(client: Any, engine: Any, runtime: Any, accounts: Any,
                                stripe_fake: Any) -> tuple[InBadDebt, int, dict[str, Any]]:
    debt = into_bad_debt(client, engine, runtime, accounts, amount=DEBT, currency="usd")
    stripe_fake.add_invoice(debt.invoice_object)
    stripe_fake.intent_outcome = "server_error_after_charge"
    response = pay(client, {"account_id": debt.account, "amount": DEBT}, key())
    assert (response.status_code, response.json["state"]) == (502, "pending")
    [intent] = stripe_fake.charged_behind_errors
    return debt, int(response.json["payment_id"]), intent


@pytest.mark.parametrize("changes", [{"currency": "jpy"}, {"amount": DEBT - 10}], ids=["currency", "amount"])
def test_a_success_for_other_money_naming_the_payment_pays_none_of_its_invoices(client, engine, runtime, accounts,
                                                                                stripe_fake, changes):
    debt, payment_id, intent = _paid_behind_a_server_error(client, engine, runtime, accounts, stripe_fake)
    other = intent_event("succeeded", debt, "pi_other_money_" + key()[:12], payment_id)
    other["data"]["object"].update(changes)
    assert post_event(client, other).status_code == 200

    assert settle(runtime, payment_id).outcome == "not_charged"
    assert stripe_fake.invoice_payments() == []
    [row] = payments(engine, debt.account)
    assert (row["state"], row["stripe_payment_intent_id"]) == ("pending", None)
    assert recompute(engine, runtime, debt.account)["status"] == "lifting"

    # The payment's own intent, for its amount in its currency, still settles the debt.
    own = intent_event("succeeded", debt, intent["id"], payment_id)
    assert post_event(client, own).status_code == 200
    assert settle(runtime, payment_id).outcome == "settled"
    [paid] = stripe_fake.invoice_payments()
    assert paid.path == f"/v1/invoices/{debt.invoice}/pay"
    assert recompute(engine, runtime, debt.account)["status"] == "current"


def test_a_failure_for_other_money_naming_the_payment_leaves_it_in_flight(client, engine, runtime, accounts,
                                                                         stripe_fake):
    debt, payment_id, _ = _paid_behind_a_server_error(client, engine, runtime, accounts, stripe_fake)
    other = intent_event("failed", debt, "pi_other_money_" + key()[:12], payment_id, decline="insufficient_funds")
    other["data"]["object"]["currency"] = "jpy"
    assert post_event(client, other).status_code == 200

    [row] = payments(engine, debt.account)
    assert (row["state"], row["failure_reason"]) == ("pending", None)
    assert recompute(engine, runtime, debt.account)["status"] == "lifting"
    # A second payment cannot start while the first may still be charging.
    again = pay(client, {"account_id": debt.account, "amount": DEBT}, key())
    assert (again.status_code, again.json["error"]) == (409, "payment_in_flight")
