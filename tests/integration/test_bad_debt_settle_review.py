"""Settling a bad-debt payment: a call Stripe refused before running it is no call of ours."""

from __future__ import annotations

from typing import Any

import pytest
import stripe
from flask.testing import FlaskClient
from sqlalchemy import Engine

from app.money import money
from tests.conftest import post_event
from tests.integration.bad_debt_setup import InBadDebt, intent_event, key, pay


def charged_payment(client: FlaskClient, debtor: InBadDebt) -> int:
    """A bad-debt payment whose success webhook came in: ready to settle."""
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    evt = intent_event("succeeded", debtor, response.json["stripe_payment_intent_id"], response.json["payment_id"])
    assert post_event(client, evt).status_code == 200
    return int(response.json["payment_id"])


def overpaid_alerts(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.exec_driver_sql(
            "SELECT account_id, state, error, task_args FROM subs_stuck_events WHERE task_name = %(t)s",
            {"t": "tasks.bad_debt_overpayment_refunded"}).mappings()]


@pytest.mark.parametrize("refusal, error", [("rate_limited", stripe.RateLimitError)])
def test_an_invoice_closed_by_someone_else_after_a_refused_first_call_is_paid_twice(
        client, engine, runtime, debtor, stripe_fake, refusal, error):
    """The settlement's first call is refused before it runs (a rate limit); meanwhile support marks
    the invoice paid out of band (the customer paid by bank transfer, say). The retry finds it
    paid: closed by someone else, not by a call of ours, so the customer paid twice."""
    from app.payments.bad_debt_settle import settle

    payment_id = charged_payment(client, debtor)
    stripe_fake.pay_outcome = refusal
    with pytest.raises(error):
        settle(runtime, payment_id)
    stripe_fake.pay_outcome = "paid"
    # support's own call: no idempotency key of ours, and no payment of the customer's at Stripe
    status, _ = stripe_fake.handle("POST", f"/v1/invoices/{debtor.invoice}/pay", None, {"paid_out_of_band": "true"})
    assert status == 200
    settled = settle(runtime, payment_id)
    assert settled.outcome == "settled"
    assert settled.settled_elsewhere == (debtor.invoice,) and "closed some other way" in settled.details[0]
    [alert] = overpaid_alerts(engine)
    assert alert["task_args"] == {"payment_id": payment_id} and alert["error"].startswith("overpaid:")


def test_a_call_refused_before_it_ran_is_sent_again_under_the_same_key(client, engine, runtime, debtor,
                                                                      stripe_fake):
    """Nothing ran under the refused call's key, so the call after it is still the first: it pays
    the invoice, and that is no overpayment."""
    from app.payments.bad_debt_settle import settle

    payment_id = charged_payment(client, debtor)
    stripe_fake.pay_outcome = "rate_limited"
    with pytest.raises(stripe.RateLimitError):
        settle(runtime, payment_id)
    stripe_fake.pay_outcome = "paid"
    settled = settle(runtime, payment_id)
    assert (settled.outcome, settled.settled_elsewhere) == ("settled", ())
    keys = [c.idempotency_key for c in stripe_fake.calls if c.path.endswith("/pay")]
    assert keys == [f"bad-debt-settle-{payment_id}-{debtor.invoice}"] * 2
    assert overpaid_alerts(engine) == []


def test_a_charge_refunded_after_a_refused_settlement_call_names_no_invoice_as_maybe_paid(
        client, engine, runtime, debtor, stripe_fake):
    """A refund before settlement names the invoices a call of ours may have paid out of band; one
    refused before it ran paid nothing."""
    from app.payments.bad_debt_settle import settle
    from tests.integration.bad_debt_setup import payments, refund

    payment_id = charged_payment(client, debtor)
    stripe_fake.pay_outcome = "rate_limited"
    with pytest.raises(stripe.RateLimitError):
        settle(runtime, payment_id)
    [row] = payments(engine, debtor.account)
    assert row["settle_sent"] == {}
    refund(client, debtor, row["stripe_payment_intent_id"])
    assert settle(runtime, payment_id).outcome == "refunded"
    assert payments(engine, debtor.account)[0]["state"] == "failed"
    assert overpaid_alerts(engine) == []  # refunded in full, nothing paid out of band: nothing to look at


def test_a_settlement_refused_for_a_revoked_api_key_waits_for_a_working_key_not_for_an_operator(
        client, engine, runtime, debtor, stripe_fake, celery_app, settings):
    """The key was rolled in Stripe's Dashboard while a charged payment waited to be settled: every
    call is a 401. That is no fault of the payment's: it was filed as a refused API call (dead stuck
    work), which the settlement sweep passes over, so the customer's payment stayed unsettled (the
    account lifting) even once the key was replaced, until an operator re-drove it. It is now a
    failure that passes (retrying), and the sweep settles the payment once Stripe takes the key."""
    from tasks.bad_debt import SETTLE
    from tests.integration.bad_debt_setup import payments
    from tests.integration.test_bad_debt_reconcile import stuck_of, take_queued_settlements

    payment_id = charged_payment(client, debtor)
    take_queued_settlements(settings)  # the webhook's: run here instead
    stripe_fake.key_revoked = True
    result = celery_app.tasks[SETTLE].apply([payment_id])
    assert result.failed() and "Stripe refused our API key" in str(result.result)
    assert stripe_fake.refused and stripe_fake.invoice_payments() == []
    assert stuck_of(engine, SETTLE, debtor.account) == ["retrying"]
    assert payments(engine, debtor.account)[0]["state"] == "pending"

    stripe_fake.key_revoked = False  # a working key is configured
    with engine.begin() as conn:  # charged a while ago: the sweep's to settle
        conn.exec_driver_sql("UPDATE bad_debt_payment SET updated_at = updated_at - interval '5 minutes' "
                             "WHERE id = %(id)s", {"id": payment_id})
    assert celery_app.tasks["tasks.settle_unsettled_bad_debt_payments"].apply().get() == {"found": 1, "sent": 1}
    assert take_queued_settlements(settings) == [payment_id]
    assert celery_app.tasks[SETTLE].apply([payment_id]).get()["outcome"] == "settled"
    assert payments(engine, debtor.account)[0]["state"] == "succeeded"
    assert stuck_of(engine, SETTLE, debtor.account) == ["resolved"]


def test_a_late_success_of_a_payment_failed_for_its_refund_does_not_put_it_back_in_flight(
        client, engine, runtime, debtor, stripe_fake, settings, celery_app):
    """A bad-debt payment refunded before it settled is failed by its settlement (the money went
    back; an operator is alerted). Stripe's payment_intent.succeeded for it delivered again, or late,
    reopened it as a charge that succeeded after all: the account went back to lifting (held below
    bad debt, entitlements eased) and its settlement ran again only to fail it once more. A charge
    refunded is no payment of the debt: the payment stays failed, the account in bad debt."""
    from tasks.bad_debt import SETTLE
    from tests.integration.bad_debt_setup import payments, refund
    from tests.integration.test_bad_debt_reconcile import take_queued_settlements

    payment_id = charged_payment(client, debtor)
    take_queued_settlements(settings)  # the webhook's: run here instead
    [row] = payments(engine, debtor.account)
    refund(client, debtor, row["stripe_payment_intent_id"])
    assert celery_app.tasks[SETTLE].apply([payment_id]).get()["outcome"] == "refunded"
    assert payments(engine, debtor.account)[0]["state"] == "failed"

    late = intent_event("succeeded", debtor, row["stripe_payment_intent_id"], payment_id)
    late["id"] = late["id"] + "_late"  # another delivery of the outcome (Stripe may send an event twice)
    assert post_event(client, late).status_code == 200
    assert payments(engine, debtor.account)[0]["state"] == "failed"
    assert take_queued_settlements(settings) == []


def test_a_late_success_of_a_payment_failed_unseen_whose_charge_was_refunded_in_part_alerts_the_overpayment(
        client, engine, runtime, debtor, stripe_fake, settings, celery_app):
    """The reconciliation failed a payment as never created (Stripe's listing did not show it) that
    had charged all the same; part of that charge was refunded (at Stripe, by support) and its
    charge.refunded came in before the intent's late payment_intent.succeeded (Stripe does not keep
    their order). The customer paid the rest for nothing: the settlement of the late success names
    it for an operator. Passing over every failed payment whose charge was refunded (as one failed
    for its refund is) left the payment failed with no alert, the money kept unseen."""
    from tasks.bad_debt import SETTLE
    from tests.integration.bad_debt_setup import payments, refund
    from tests.integration.test_bad_debt_reconcile import failed_with_a_hidden_charge, take_queued_settlements

    payment_id, charged = failed_with_a_hidden_charge(client, engine, runtime, debtor, stripe_fake)
    take_queued_settlements(settings)
    refund(client, debtor, charged["id"], amount=debtor.amount // 2)
    late = intent_event("succeeded", debtor, charged["id"], payment_id)
    assert post_event(client, late).status_code == 200
    for queued in take_queued_settlements(settings):
        celery_app.tasks[SETTLE].apply([queued]).get()

    [row] = payments(engine, debtor.account)
    assert row["state"] == "failed"
    [alert] = overpaid_alerts(engine)
    assert alert["task_args"] == {"payment_id": payment_id}
    assert f"owed the other {money(debtor.amount - debtor.amount // 2, 'usd')}" in alert["error"]


def test_a_payment_failed_unseen_settled_for_its_refund_while_another_was_in_flight_stays_failed(
        client, engine, runtime, debtor, stripe_fake, settings, celery_app):
    """The late success of a payment the reconciliation failed as never created came while the
    customer's next payment held the in-flight slot: it is settled as it is, failed, and its
    settlement finds the charge refunded in part (an operator is alerted). Its failure_reason stayed
    the reconciliation's (MARK_FAILED changes only a pending payment), and REOPEN tells a payment
    failed for its refund by that text only: once the slot was free, the success delivered again
    put it back in flight (the account lifting) for a settlement that could only fail it again."""
    from tasks.bad_debt import SETTLE
    from tests.integration.bad_debt_setup import payments, refund
    from tests.integration.test_bad_debt_reconcile import failed_with_a_hidden_charge, take_queued_settlements

    payment_id, charged = failed_with_a_hidden_charge(client, engine, runtime, debtor, stripe_fake)
    take_queued_settlements(settings)
    stripe_fake.intent_outcome = "processing"
    second = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key()).json
    refund(client, debtor, charged["id"], amount=debtor.amount // 2)
    late = intent_event("succeeded", debtor, charged["id"], payment_id)
    assert post_event(client, late).status_code == 200
    assert take_queued_settlements(settings) == [payment_id]  # settled as it is: the slot is taken
    assert celery_app.tasks[SETTLE].apply([payment_id]).get()["outcome"] == "refunded"
    assert len(overpaid_alerts(engine)) == 1

    declined = intent_event("payment_failed", debtor, second["stripe_payment_intent_id"], second["payment_id"],
                            decline="insufficient_funds")
    assert post_event(client, declined).status_code == 200  # the slot is free again
    again = intent_event("succeeded", debtor, charged["id"], payment_id)
    again["id"] = again["id"] + "_again"  # Stripe delivers an event more than once
    assert post_event(client, again).status_code == 200
    assert [p["state"] for p in payments(engine, debtor.account)] == ["failed", "failed"]
    assert take_queued_settlements(settings) == []


@pytest.mark.parametrize("task_name", ["tasks.settle_bad_debt_payment", "tasks.reconcile_bad_debt_payment"])
def test_a_revoked_api_key_is_asked_once_a_run_and_named_on_the_stuck_row(
        client, engine, runtime, debtor, stripe_fake, celery_app, settings, task_name):
    """A key Stripe refuses (401: rolled or revoked) stays refused for the worker's life: the key is
    read at its start. Filed as remote_unavailable, each run retried itself 8 times (each a 401 at
    Stripe, a warning in the log), every beat sweep and re-drive again, and the row read like a
    Stripe outage. A run asks once and leaves its row retrying (beat re-drives it), under a class
    of its own that says what an operator must fix."""
    from datetime import timedelta

    from tests.integration.bad_debt_setup import payments
    from tests.integration.test_bad_debt_reconcile import backdate, take_queued_settlements

    if task_name == "tasks.settle_bad_debt_payment":
        payment_id = charged_payment(client, debtor)
        take_queued_settlements(settings)
    else:
        stripe_fake.intent_outcome = "processing"
        payment_id = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key()).json["payment_id"]
        backdate(engine, payment_id, timedelta(minutes=31))
    stripe_fake.key_revoked = True

    result = celery_app.tasks[task_name].apply([payment_id])
    assert result.failed() and "Stripe refused our API key" in str(result.result)
    assert len(stripe_fake.refused) == 1
    with engine.connect() as conn:
        [(state, error_class)] = conn.exec_driver_sql(
            "SELECT state, error_class FROM subs_stuck_events WHERE task_name = %(t)s AND account_id = %(a)s",
            {"t": task_name, "a": debtor.account}).fetchall()
    assert (state, error_class) == ("retrying", "credentials_refused")
    assert payments(engine, debtor.account)[0]["state"] == "pending"
