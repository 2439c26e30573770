"""A credit note issued on a covered invoice while a bad-debt payment ran: the customer paid for it too.

Stripe lowers an open invoice's amount_remaining (and amount_due) by a credit note's pre-payment
part, and adds it to pre_payment_credit_notes_amount; no invoice payment is made. The bad-debt
charge took the whole quote all the same, so the customer overpaid by the credit.
"""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient
from prometheus_client import REGISTRY
from sqlalchemy import Engine

from tests.conftest import post_event, wait_for
from tests.fakes.fake_stripe_payments import FakeStripePayments
from tests.integration.bad_debt_setup import InBadDebt, intent_event, into_bad_debt, key, pay, payments, recompute
from tests.stripe_events import event

OVERPAID = "tasks.bad_debt_overpayment_refunded"


def alerts(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.exec_driver_sql(
            "SELECT account_id, state, error, task_args FROM subs_stuck_events WHERE task_name = %(t)s ORDER BY id",
            {"t": OVERPAID}).mappings()]


def overpaid_total() -> float:
    return REGISTRY.get_sample_value("dunning_bad_debt_overpaid_total") or 0.0


def quoted(client: FlaskClient, debtor: InBadDebt, stripe_fake: FakeStripePayments) -> dict[str, Any]:
    """A bank debit for the whole balance, accepted and processing at Stripe (it takes days)."""
    stripe_fake.intent_outcome = "processing"
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert response.status_code == 202, response.json
    return dict(response.json)


def succeeded(client: FlaskClient, debtor: InBadDebt, payment: dict[str, Any]) -> None:
    evt = intent_event("succeeded", debtor, payment["stripe_payment_intent_id"], payment["payment_id"])
    assert post_event(client, evt).status_code == 200


def charged(client: FlaskClient, debtor: InBadDebt, stripe_fake: FakeStripePayments) -> int:
    payment = quoted(client, debtor, stripe_fake)
    succeeded(client, debtor, payment)
    return int(payment["payment_id"])


def credited_and_told(client: FlaskClient, debtor: InBadDebt, stripe_fake: FakeStripePayments, amount: int) -> None:
    """A credit note on the invoice, and Stripe's invoice.updated for it (the fixtures hold no such
    envelope: marked_uncollectible's, its type changed, with Stripe's invoice as it is now)."""
    stripe_fake.credit_note(debtor.invoice, amount)
    evt = event("invoice.marked_uncollectible")
    evt["type"], evt["data"]["object"] = "invoice.updated", dict(stripe_fake.invoices[debtor.invoice])
    assert post_event(client, evt).status_code == 200


@pytest.mark.worker
def test_a_partial_credit_note_while_a_bank_debit_processed_is_an_overpayment(client, engine, debtor, stripe_fake,
                                                                             worker):
    """Quoted 1000; the business credits 300 of the invoice while the debit processes; the debit
    succeeds for 1000. Stripe lists no payment of the customer's on the invoice, yet it owed 700
    when it was settled: the customer is owed 300."""
    before = overpaid_total()
    payment = quoted(client, debtor, stripe_fake)
    stripe_fake.credit_note(debtor.invoice, 300)
    invoice = stripe_fake.invoices[debtor.invoice]
    assert (invoice["status"], invoice["amount_remaining"]) == ("uncollectible", 700)  # still owed, in part
    succeeded(client, debtor, payment)

    [alert] = wait_for(lambda: alerts(engine), message="the overpayment alert")
    assert alert["account_id"] == debtor.account and alert["state"] == "dead"
    assert alert["task_args"] == {"payment_id": payment["payment_id"]}
    assert alert["error"].startswith("overpaid:")
    assert f"{debtor.invoice}: 3.00 USD credited by a credit note" in alert["error"]
    wait_for(lambda: overpaid_total() == before + 1, message="counted")
    assert payments(engine, debtor.account)[0]["state"] == "succeeded"  # the debt is settled all the same


@pytest.mark.worker
def test_a_bank_debit_with_no_credit_note_meanwhile_is_no_overpayment(client, engine, debtor, stripe_fake, worker):
    before = overpaid_total()
    succeeded(client, debtor, quoted(client, debtor, stripe_fake))
    wait_for(lambda: payments(engine, debtor.account)[0]["state"] == "succeeded", message="settled")
    assert stripe_fake.invoices[debtor.invoice]["status"] == "paid"
    assert alerts(engine) == []
    assert overpaid_total() == before


def test_the_quote_keeps_what_each_invoice_owed_at_stripe(client, engine, debtor, stripe_fake):
    payment = quoted(client, debtor, stripe_fake)
    [row] = payments(engine, debtor.account)
    assert row["id"] == payment["payment_id"]
    assert row["invoices_quoted"] == {debtor.invoice: {"amount_remaining": 1000, "pre_payment_credit_notes_amount": 0}}


def test_a_credit_note_issued_before_the_quote_is_not_paid_for_twice(client, engine, runtime, accounts, stripe_fake):
    """Invoiced 1000, 300 credited weeks ago (the mirror knows: it owes 700), the quote 700."""
    from app.payments.bad_debt_settle import settle

    debt = into_bad_debt(client, engine, runtime, accounts, amount=700)
    stripe_fake.add_invoice({**debt.invoice_object, "pre_payment_credit_notes_amount": 300})
    settled = settle(runtime, charged(client, debt, stripe_fake))
    assert (settled.outcome, settled.settled_elsewhere) == ("settled", ())
    assert alerts(engine) == []


def test_a_credit_note_for_the_whole_balance_is_one_overpayment_naming_the_credit(client, engine, runtime, debtor,
                                                                                   stripe_fake):
    """Credited down to nothing, the invoice is paid at Stripe: the settlement's first call is refused.
    One detail for the invoice (the credit, not also 'closed some other way'), one alert."""
    from app.payments.bad_debt_settle import settle

    payment_id = charged(client, debtor, stripe_fake)
    stripe_fake.credit_note(debtor.invoice, 1000)
    assert stripe_fake.invoices[debtor.invoice]["status"] == "paid"
    settled = settle(runtime, payment_id)
    assert settled.settled_elsewhere == (debtor.invoice,)
    assert settled.details == (f"{debtor.invoice}: 10.00 USD credited by a credit note",)
    [alert] = alerts(engine)
    assert alert["error"].startswith("overpaid:") and "closed some other way" not in alert["error"]


def test_a_credit_note_and_a_payment_of_the_customers_on_one_invoice_are_one_detail(client, engine, runtime,
                                                                                     debtor, stripe_fake):
    """200 credited and 300 paid by the customer on the hosted page, both while the payment ran: the
    customer is owed 500, said once for the invoice."""
    from app.payments.bad_debt_settle import settle

    payment_id = charged(client, debtor, stripe_fake)
    stripe_fake.credit_note(debtor.invoice, 200)
    stripe_fake.pay_elsewhere(debtor.invoice, amount=300)
    settled = settle(runtime, payment_id)
    assert settled.details == (f"{debtor.invoice}: 3.00 USD paid by the customer, 2.00 USD credited by a credit note",)
    [alert] = alerts(engine)
    assert alert["error"].count(debtor.invoice) == 1


def test_a_settlement_retried_after_its_call_paid_the_invoice_still_sees_the_credit(client, engine, runtime,
                                                                                    debtor, stripe_fake):
    """Credited 300, then our call pays the invoice out of band behind a 500 and the run fails: the
    run after it finds the invoice paid (its own doing) and still owes the customer the credit."""
    import stripe

    from app.payments.bad_debt_settle import settle

    payment_id = charged(client, debtor, stripe_fake)
    stripe_fake.credit_note(debtor.invoice, 300)
    stripe_fake.pay_outcome = "server_error_after_pay"
    stripe_fake.invoice_payments_down = True  # the run fails after its out-of-band pay
    with pytest.raises(stripe.APIError):
        settle(runtime, payment_id)
    stripe_fake.pay_outcome, stripe_fake.invoice_payments_down = "paid", False
    settled = settle(runtime, payment_id)
    assert settled.details == (f"{debtor.invoice}: 3.00 USD credited by a credit note",)


def test_a_payment_quoted_before_credit_notes_were_kept_settles_as_before(client, engine, runtime, debtor,
                                                                        stripe_fake):
    """A payment row written before the migration holds no quote of the invoices: nothing to compare
    a credit note with, so none is reported (and nothing fails)."""
    from app.payments.bad_debt_settle import settle

    payment_id = charged(client, debtor, stripe_fake)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE bad_debt_payment SET invoices_quoted = DEFAULT WHERE id = %(id)s",
                             {"id": payment_id})
    stripe_fake.credit_note(debtor.invoice, 300)
    settled = settle(runtime, payment_id)
    assert (settled.outcome, settled.settled_elsewhere) == ("settled", ())
    assert alerts(engine) == []


@pytest.mark.parametrize("credited", ["before_the_second_quote", "while_the_second_ran"])
def test_a_late_charge_of_a_debt_another_payment_settled_names_that_payment_only(client, engine, runtime, debtor,
                                                                               stripe_fake, credited):
    """A payment failed as never created (1000), 300 credited before or after a second payment's
    quote, the second one settled, then the first one's charge turned up: all of the first is owed
    back, said once for the invoice. The credit is not said again: the second quote took it in (700
    charged), or the second settlement named it (the customer would be refunded it twice)."""
    from app.payments.bad_debt_settle import settle
    from tests.integration.test_bad_debt_reconcile import failed_with_a_hidden_charge

    first, late = failed_with_a_hidden_charge(client, engine, runtime, debtor, stripe_fake)
    stripe_fake.intent_outcome = "succeeded"
    if credited == "before_the_second_quote":
        credited_and_told(client, debtor, stripe_fake, 300)
        recompute(engine, runtime, debtor.account)
    owed = stripe_fake.invoices[debtor.invoice]["amount_remaining"]
    second = pay(client, {"account_id": debtor.account, "amount": owed}, key())
    assert second.status_code == 202, second.json
    if credited == "while_the_second_ran":
        stripe_fake.credit_note(debtor.invoice, 300)
    succeeded(client, debtor, dict(second.json))
    told = settle(runtime, second.json["payment_id"]).details
    assert told == ((f"{debtor.invoice}: 3.00 USD credited by a credit note",) if credited == "while_the_second_ran"
                    else ())

    assert post_event(client, intent_event("succeeded", debtor, late["id"], first)).status_code == 200
    settled = settle(runtime, first)
    assert settled.details == (f"{debtor.invoice}: also paid by bad-debt payment {second.json['payment_id']}",)
    assert [a["task_args"]["payment_id"] for a in alerts(engine)][-1] == first
    assert "credited" not in alerts(engine)[-1]["error"]


def test_a_settlement_delivered_twice_alerts_the_credit_once(client, engine, runtime, debtor, stripe_fake):
    """The settlement task redelivered after its run committed (a worker lost before its ack): the
    second run finds the payment done, and neither alerts nor counts the credit again."""
    from app.payments.bad_debt_settle import settle

    payment_id = charged(client, debtor, stripe_fake)
    stripe_fake.credit_note(debtor.invoice, 300)
    assert settle(runtime, payment_id).settled_elsewhere == (debtor.invoice,)
    again = settle(runtime, payment_id)
    assert (again.outcome, again.settled_elsewhere, again.alerted) == ("already_done", (), False)
    assert len(alerts(engine)) == 1
