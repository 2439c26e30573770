"""The reason ``bad_debt.payment_failed`` ("the bad-debt payment failed; the account stays in bad
debt") belongs to the debt the failed payment was for: the invoices it quoted (README: a declined
payment returns the account to bad debt with that reason). A payment that failed in an earlier bad
debt, since ended otherwise (its invoice voided by support), says nothing of a later bad debt the
customer never tried to pay: support reading it would tell the customer their payment failed."""

from __future__ import annotations

import time
from typing import Any

from tests.conftest import post_event
from tests.integration.bad_debt_setup import DAY, InBadDebt, into_bad_debt, key, pay, recompute
from tests.stripe_events import event, unique, with_product


def _failed_reasons(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in summary["reasons"] if r["rule"] == "bad_debt.payment_failed"]


def _new_bad_debt(client: Any, debt: InBadDebt, amount: int) -> dict[str, Any]:
    """Another invoice of the customer, marked uncollectible: a new bad debt. Stripe's copy of it."""
    t = int(time.time()) - 2 * DAY
    evt = with_product(event("invoice.marked_uncollectible", id=unique("in"), customer=debt.customer, created=t,
                             amount_due=amount, amount_remaining=amount, amount_paid=0, total=amount,
                             paths={"created": t - DAY}), "prod_premium", amount)
    assert post_event(client, evt).status_code == 200
    return evt["data"]["object"]


def test_a_payment_that_failed_in_an_earlier_bad_debt_is_no_reason_of_a_new_one(client, engine, runtime, accounts,
                                                                                stripe_fake):
    debt = into_bad_debt(client, engine, runtime, accounts)
    stripe_fake.add_invoice(debt.invoice_object)
    stripe_fake.intent_outcome = "decline"
    declined = pay(client, {"account_id": debt.account, "amount": debt.amount}, key())
    assert declined.status_code == 402
    first = recompute(engine, runtime, debt.account)
    assert first["status"] == "bad_debt"
    [reason] = _failed_reasons(first)  # this debt's payment failed: said
    assert reason["facts"]["payment"] == declined.json["payment_id"]

    # Support voids the invoice: that bad debt ends without the customer paying.
    assert post_event(client, event("invoice.voided", id=debt.invoice, customer=debt.customer)).status_code == 200
    assert recompute(engine, runtime, debt.account)["status"] == "current"

    # Weeks later another invoice goes bad: a new bad debt, no payment tried for it.
    invoice = _new_bad_debt(client, debt, 700)
    second = recompute(engine, runtime, debt.account)
    assert second["status"] == "bad_debt" and second["outstanding_amount"] == 700
    assert _failed_reasons(second) == [], second["reasons"]

    # Its own payment, declined, is said again (naming that payment).
    stripe_fake.add_invoice(invoice)
    again = pay(client, {"account_id": debt.account, "amount": 700}, key())
    assert again.status_code == 402
    third = recompute(engine, runtime, debt.account)
    assert third["status"] == "bad_debt"
    [reason] = _failed_reasons(third)
    assert reason["facts"]["payment"] == again.json["payment_id"]
