"""The bad-debt texts a person reads name amounts in the currency's major units (app/money.py).

Stripe's amounts are integers of the currency's minor units: 300 usd is $3.00, 300 jpy is ¥300, 300
kwd is 0.300 KWD. The settlement's details and its alerts (the support page's Stuck work table,
/ops errors) and /pay-bad-debt's refusal reason are prose for support: "300 usd paid by the
customer" reads as three hundred dollars. The JSON fields and the stored integers stay minor units.
"""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine

from app.runtime import Runtime
from tests.conftest import Accounts, post_event
from tests.fakes.fake_stripe_payments import FakeStripePayments
from tests.integration.bad_debt_setup import InBadDebt, intent_event, into_bad_debt, key, pay, payments, refund

OVERPAID = "tasks.bad_debt_overpayment_refunded"
DEBT = 100_000  # minor units: 1000.00 USD, 100000 JPY, 100.000 KWD

# currency, DEBT as read, 300 as read, 200 as read
CURRENCIES = [("usd", "1000.00 USD", "3.00 USD", "2.00 USD"),
              ("jpy", "100000 JPY", "300 JPY", "200 JPY"),  # zero-decimal: never divided by 100
              ("kwd", "100.000 KWD", "0.300 KWD", "0.200 KWD")]  # three decimals


def in_bad_debt(client: FlaskClient, engine: Engine, runtime: Runtime, accounts: Accounts,
                stripe_fake: FakeStripePayments, currency: str) -> InBadDebt:
    debt = into_bad_debt(client, engine, runtime, accounts, amount=DEBT, currency=currency)
    stripe_fake.add_invoice(debt.invoice_object)
    return debt


def charged(client: FlaskClient, debt: InBadDebt) -> int:
    response = pay(client, {"account_id": debt.account, "amount": debt.amount}, key())
    assert response.status_code == 202, response.json
    evt = intent_event("succeeded", debt, response.json["stripe_payment_intent_id"], response.json["payment_id"])
    assert post_event(client, evt).status_code == 200
    return int(response.json["payment_id"])


def stuck(engine: Engine, task: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.exec_driver_sql(
            "SELECT account_id, error, task_args FROM subs_stuck_events WHERE task_name = %(t)s ORDER BY id",
            {"t": task}).mappings()]


@pytest.mark.parametrize("currency, debt_read, paid_read, credited_read", CURRENCIES)
def test_what_else_settled_an_invoice_is_said_in_major_units(client, engine, runtime, accounts, stripe_fake,
                                                             currency, debt_read, paid_read, credited_read):
    """200 credited and 300 paid by the customer while the payment ran: the detail and the overpaid
    alert say so in the invoice's currency's major units (the values are those of Stripe's record)."""
    from app.payments.bad_debt_settle import settle

    debt = in_bad_debt(client, engine, runtime, accounts, stripe_fake, currency)
    payment_id = charged(client, debt)
    stripe_fake.credit_note(debt.invoice, 200)
    stripe_fake.pay_elsewhere(debt.invoice, amount=300)
    settled = settle(runtime, payment_id)
    detail = f"{debt.invoice}: {paid_read} paid by the customer, {credited_read} credited by a credit note"
    assert settled.details == (detail,)
    [alert] = stuck(engine, OVERPAID)
    assert alert["error"].startswith(f"overpaid: bad-debt payment {payment_id} ({debt_read}) also covered")
    assert detail in alert["error"]


@pytest.mark.parametrize("currency, debt_read, one_read", [("usd", "1000.00 USD", "1000.01 USD"),
                                                          ("jpy", "100000 JPY", "100001 JPY"),
                                                          ("kwd", "100.000 KWD", "100.001 KWD")])
def test_an_amount_refused_names_the_balance_in_major_units_and_the_integer_to_send(client, engine, runtime, accounts,
                                                                                   stripe_fake, currency, debt_read,
                                                                                   one_read):
    """The reason is prose for whoever reads the refusal; the fields stay the integers the API takes."""
    debt = in_bad_debt(client, engine, runtime, accounts, stripe_fake, currency)
    response = pay(client, {"account_id": debt.account, "amount": DEBT + 1}, key())
    assert (response.status_code, response.json["error"]) == (422, "amount_mismatch")
    assert (response.json["outstanding_amount"], response.json["outstanding_currency"]) == (DEBT, currency)
    reason = response.json["reason"]
    assert debt_read in reason and f"amount {DEBT}" in reason  # what is owed, and the integer that pays it
    assert f"{one_read} was sent" in reason
    assert f"{DEBT} {currency}" not in reason


def test_an_intent_for_another_amount_than_its_payment_is_said_in_major_units(client, engine, runtime, accounts,
                                                                             stripe_fake):
    """The payment's create answered a 500 and Stripe made the intent all the same; the one found is
    for the same integer in another currency (¥100000 is about $650, not $1000): the reconciliation
    refuses it, and its error (stuck work, /ops errors) says both amounts as they are worth."""
    from datetime import UTC, datetime, timedelta

    from app.payments.bad_debt_reconcile import NotReconciled, reconcile

    debt = in_bad_debt(client, engine, runtime, accounts, stripe_fake, "jpy")
    stripe_fake.intent_outcome = "server_error_after_charge"
    response = pay(client, {"account_id": debt.account, "amount": DEBT}, key())
    assert (response.status_code, response.json["state"]) == (502, "pending")
    [intent] = stripe_fake.charged_behind_errors
    assert (intent["amount"], intent["currency"]) == (DEBT, "jpy")
    intent["currency"] = "usd"
    with pytest.raises(NotReconciled) as refused:
        reconcile(runtime, response.json["payment_id"], datetime.now(UTC) + timedelta(minutes=31))
    assert str(refused.value) == (f"payment intent {intent['id']} is for 1000.00 USD, bad-debt payment "
                                  f"{response.json['payment_id']} for 100000 JPY")


# currency, DEBT as read, 100 as read, DEBT - 100 as read, 300 as read
REFUNDS = [("usd", "1000.00 USD", "1.00 USD", "999.00 USD", "3.00 USD"),
           ("jpy", "100000 JPY", "100 JPY", "99900 JPY", "300 JPY"),
           ("kwd", "100.000 KWD", "0.100 KWD", "99.900 KWD", "0.300 KWD")]


@pytest.mark.parametrize("currency, debt_read, hundred_read, rest_read, _", REFUNDS)
def test_a_refund_before_settlement_is_said_in_major_units(client, engine, runtime, accounts, stripe_fake,
                                                           currency, debt_read, hundred_read, rest_read, _):
    """100 refunded before the settlement: the payment fails with what went back of what, and the
    overpaid alert says what the customer is still owed (the rest)."""
    from app.payments.bad_debt_settle import settle

    debt = in_bad_debt(client, engine, runtime, accounts, stripe_fake, currency)
    payment_id = charged(client, debt)
    refund(client, debt, str(payments(engine, debt.account)[0]["stripe_payment_intent_id"]), amount=100)
    assert settle(runtime, payment_id).outcome == "refunded"
    [row] = payments(engine, debt.account)
    assert (row["state"], row["failure_reason"]) == ("failed", f"refunded before settlement ({hundred_read} of "
                                                               f"{debt_read})")
    assert (row["amount"], row["currency"]) == (DEBT, currency)  # the stored integers as they were
    [alert] = stuck(engine, OVERPAID)
    assert alert["error"] == (f"overpaid: bad-debt payment {payment_id} ({debt_read}) was refunded {hundred_read} "
                              f"before it settled, and failed; the customer is owed the other {rest_read}")


@pytest.mark.parametrize("currency, debt_read, _, __, three_hundred_read", REFUNDS)
def test_a_refund_after_settlement_is_said_in_major_units(client, engine, runtime, accounts, stripe_fake,
                                                          currency, debt_read, _, __, three_hundred_read):
    from app.payments.bad_debt_settle import settle
    from tasks.bad_debt import REFUNDED_AFTER_SETTLEMENT

    debt = in_bad_debt(client, engine, runtime, accounts, stripe_fake, currency)
    payment_id = charged(client, debt)
    assert settle(runtime, payment_id).outcome == "settled"
    refund(client, debt, str(payments(engine, debt.account)[0]["stripe_payment_intent_id"]), amount=300)
    [alert] = stuck(engine, REFUNDED_AFTER_SETTLEMENT)
    assert alert["error"].startswith(f"refunded after settlement: bad-debt payment {payment_id} ({debt_read}) was "
                                     f"refunded ({three_hundred_read}) after it paid invoice(s) {debt.invoice} ")


@pytest.mark.parametrize("currency, debt_read, _, __, three_hundred_read", REFUNDS)
def test_a_dispute_is_said_in_major_units(client, engine, runtime, accounts, stripe_fake, currency, debt_read, _, __,
                                          three_hundred_read):
    """The dispute's amount in its own currency (Stripe's dispute names it), the payment's in its."""
    from app.payments.bad_debt_settle import settle
    from tasks.bad_debt import DISPUTED
    from tests.integration.test_bad_debt_dispute import dispute_event

    debt = in_bad_debt(client, engine, runtime, accounts, stripe_fake, currency)
    payment_id = charged(client, debt)
    assert settle(runtime, payment_id).outcome == "settled"
    intent_id = str(payments(engine, debt.account)[0]["stripe_payment_intent_id"])
    evt = dispute_event(intent_id, stripe_fake.intents[intent_id]["latest_charge"], 300)
    evt["data"]["object"]["currency"] = currency
    assert post_event(client, evt).status_code == 200
    [alert] = stuck(engine, DISPUTED)
    assert alert["error"].startswith(f"disputed: the charge of bad-debt payment {payment_id} ({debt_read}, succeeded) "
                                     f"is disputed ({three_hundred_read}, reason ")


@pytest.mark.worker
def test_a_retry_of_an_invoice_closed_meanwhile_says_what_it_still_owed_in_major_units(client, accounts, engine, worker,
                                                                                      runtime, fake_stripe):
    """Claimed, then the invoice is marked uncollectible with 5000 (cents) still owed: the retry is
    skipped unsent, and its reason (the retry row's error) reads 50.00 USD, not 5000."""
    from datetime import UTC, datetime

    from app.payments.pay import retry_payment
    from app.payments.retries import claim_due
    from app.payments.stripe_client import make_stripe_client
    from tests.integration.dunning_setup import failed_invoice, retries
    from tests.stripe_events import event, with_product

    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2, amount=5000)
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    closed = event("invoice.marked_uncollectible", id=invoice, customer=customer, amount_due=5000,
                   amount_remaining=5000, amount_paid=0, total=5000)
    assert post_event(client, with_product(closed, "prod_core", 5000)).status_code == 200
    result = retry_payment(engine, make_stripe_client(runtime.settings), retry_id, datetime.now(UTC))
    assert (result.outcome, result.detail) == ("skipped", "invoice is uncollectible with 50.00 USD remaining")
    assert [(r["state"], r["error"]) for r in retries(engine, account)] == [
        ("skipped", "not due: invoice is uncollectible with 50.00 USD remaining")]
    assert fake_stripe.pay_requests() == []
