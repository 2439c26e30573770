"""POST /pay-bad-debt: every guard, idempotent replays, concurrency, and the way out of bad debt."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import stripe
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine

from app.money import money
from app.stuck_work import redrive_one
from tasks.failures import FailureKind, record_stuck, resolve_stuck
from tests.conftest import post_event, service_headers, wait_for
from tests.integration.bad_debt_setup import (
    InBadDebt,
    dunning_row,
    intent_event,
    into_bad_debt,
    key,
    pay,
    payments,
    recompute,
    refund,
    take_queued,
)
from tests.stripe_events import event, unique, with_product

DAY = 86400


def count(engine: Engine, sql: str, **params: Any) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(sql, params).scalar_one())


# --- guards -----------------------------------------------------------------------------------


def test_requires_a_service_token(client, engine, debtor, stripe_fake):
    body = {"account_id": debtor.account, "amount": debtor.amount}
    assert pay(client, body, key(), headers={}).status_code == 401
    wrong = pay(client, body, key(), headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json["reason"]
    assert stripe_fake.calls == [] and payments(engine, debtor.account) == []


def test_requires_an_idempotency_key(client, debtor, stripe_fake):
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount})
    assert response.status_code == 400
    assert "Idempotency-Key" in response.json["reason"]
    assert stripe_fake.calls == []


@pytest.mark.parametrize("amount", [12.5, "1000", None, True, [1000]])
def test_refuses_an_amount_that_is_not_an_integer(client, debtor, stripe_fake, amount):
    response = pay(client, {"account_id": debtor.account, "amount": amount}, key())
    assert response.status_code == 400
    assert response.json["error"] == "invalid_amount" and "integer" in response.json["reason"]
    assert stripe_fake.calls == []


@pytest.mark.parametrize("body", [[1, 2], "x", {"amount": 1000}, {"account_id": "", "amount": 1000},
                                  {"account_id": "a", "amount": 1000, "extra": 1}, {"account_id": "a", "amount": 0}])
def test_refuses_a_malformed_body(client, debtor, stripe_fake, body):
    response = pay(client, body, key())
    assert response.status_code == 400 and response.json["reason"]
    assert stripe_fake.calls == []


def test_refuses_a_body_that_is_not_json(client, debtor, stripe_fake):
    headers = {**service_headers(), "Idempotency-Key": key()}
    response = client.post("/pay-bad-debt", data="account_id=x", headers=headers)
    assert response.status_code == 400 and response.json["reason"]


def test_unknown_account_is_404(client, debtor, stripe_fake):
    response = pay(client, {"account_id": "acct_nobody", "amount": 1000}, key())
    assert response.status_code == 404 and "acct_nobody" in response.json["reason"]
    assert stripe_fake.calls == []


def test_refuses_an_account_not_in_bad_debt(client, engine, accounts, stripe_fake):
    account, _ = accounts.create()
    response = pay(client, {"account_id": account, "amount": 1000}, key())
    assert response.status_code == 409
    assert response.json["error"] == "not_in_bad_debt" and "current" in response.json["reason"]
    assert stripe_fake.calls == [] and payments(engine, account) == []


@pytest.mark.parametrize("delta", [-1, 1, 999])
def test_refuses_anything_but_the_exact_outstanding_balance(client, engine, debtor, stripe_fake, delta):
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount + delta}, key())
    assert response.status_code == 422
    assert response.json["error"] == "amount_mismatch"
    assert response.json["outstanding_amount"] == debtor.amount and str(debtor.amount) in response.json["reason"]
    assert stripe_fake.calls == [] and payments(engine, debtor.account) == []


# --- the payment itself -----------------------------------------------------------------------


def test_a_payment_charges_the_default_method_once_and_puts_the_account_in_lifting(client, engine, runtime, debtor,
                                                                                  stripe_fake):
    idem = key()
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, idem)
    assert response.status_code == 202, response.json
    body = response.json
    assert body["state"] == "pending" and body["amount"] == debtor.amount and body["stripe_payment_intent_id"]
    [call] = stripe_fake.intents_created()
    assert call.params["amount"] == str(debtor.amount) and call.params["customer"] == debtor.customer
    assert call.params["payment_method"] == debtor.payment_method and call.params["confirm"] == "true"
    # Off session, a method that redirects could never be completed: Stripe is told so (the fake, as
    # Stripe, refuses an intent confirmed without it or a return_url, the Dashboard enabling one).
    assert call.params["automatic_payment_methods[allow_redirects]"] == "never"
    assert call.params["metadata[account_id]"] == debtor.account
    assert call.params["metadata[bad_debt_payment_id]"] == str(body["payment_id"])
    assert call.idempotency_key and idem not in call.idempotency_key  # derived, not the caller's raw key
    [row] = payments(engine, debtor.account)
    assert row["state"] == "pending" and row["stripe_payment_intent_id"] == body["stripe_payment_intent_id"]
    assert row["invoice_ids"] == [debtor.invoice]

    summary = recompute(engine, runtime, debtor.account, "BAD_DEBT_PAID")
    assert summary["status"] == "lifting"
    assert any(r["rule"] == "guard.lifting" for r in summary["reasons"])
    assert dunning_row(engine, debtor.account)["status"] == "lifting"
    # Its own path: nothing in the regular retry machinery.
    assert count(engine, "SELECT count(*) FROM payment_retry") == 0

    # A second payment while this one is in flight is refused.
    again = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert again.status_code == 409 and again.json["error"] == "payment_in_flight"
    assert len(stripe_fake.intents_created()) == 1


def test_an_account_with_several_customers_is_charged_on_the_debtors_own_default_method(client, engine, runtime,
                                                                                      debtor, stripe_fake):
    # A second Stripe customer of the same account made a card its default after the debt began:
    # it is the account's newest default, but Stripe charges cus_1's debt only with cus_1's methods.
    other = unique("cus")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO subs_customer (stripe_customer_id, account_id) VALUES (%(c)s, %(a)s)",
                             {"c": other, "a": debtor.account})
    their_card = unique("pm")
    updated = event("customer.updated", id=other, created=int(time.time()) - 60,
                    paths={"invoice_settings.default_payment_method": their_card})
    assert post_event(client, updated).status_code == 200
    assert recompute(engine, runtime, debtor.account)["status"] == "bad_debt"

    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert response.status_code == 202, response.json
    [call] = stripe_fake.intents_created()
    assert (call.params["customer"], call.params["payment_method"]) == (debtor.customer, debtor.payment_method)


def test_refused_while_an_automatic_retry_of_the_account_is_being_charged(client, engine, debtor, stripe_fake):
    """Both at once could collect one invoice twice: the retry's charge and the bad-debt payment of a
    balance that still counts that invoice."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO payment_retry (account_id, invoice_id, retry_number, idempotency_key, scheduled_for, state) "
            "VALUES (%(a)s, 'in_other', 1, 'retry:in_other:1', now(), 'charging')", {"a": debtor.account})
    body = {"account_id": debtor.account, "amount": debtor.amount}
    response = pay(client, body, key())
    assert response.status_code == 409 and response.json["error"] == "payment_in_flight"
    assert "automatic payment retry" in response.json["reason"]
    assert stripe_fake.intents_created() == [] and payments(engine, debtor.account) == []
    with engine.begin() as conn:  # its outcome came in
        conn.exec_driver_sql("UPDATE payment_retry SET state = 'failed' WHERE account_id = %(a)s",
                             {"a": debtor.account})
    assert pay(client, body, key()).status_code == 202


def test_the_same_key_replays_the_first_answer_and_charges_once(client, engine, debtor, stripe_fake):
    idem, body = key(), {"account_id": debtor.account, "amount": debtor.amount}
    first = pay(client, body, idem)
    second = pay(client, body, idem)
    assert first.status_code == second.status_code == 202
    assert first.json == second.json
    assert len(stripe_fake.intents_created()) == 1 and len(payments(engine, debtor.account)) == 1


def test_the_same_key_with_another_body_is_refused(client, engine, debtor, stripe_fake):
    idem = key()
    assert pay(client, {"account_id": debtor.account, "amount": debtor.amount}, idem).status_code == 202
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount + 1}, idem)
    assert response.status_code == 422 and response.json["error"] == "idempotency_key_reused"
    assert len(stripe_fake.intents_created()) == 1


def test_a_declined_card_answers_402_with_the_reason_and_the_account_stays_in_bad_debt(client, engine, runtime,
                                                                                       debtor, stripe_fake):
    stripe_fake.intent_outcome, stripe_fake.decline_code = "decline", "insufficient_funds"
    idem, body = key(), {"account_id": debtor.account, "amount": debtor.amount}
    response = pay(client, body, idem)
    assert response.status_code == 402
    assert response.json["state"] == "failed" and "insufficient_funds" in response.json["reason"]
    [row] = payments(engine, debtor.account)
    assert row["state"] == "failed" and "insufficient_funds" in row["failure_reason"]
    summary = recompute(engine, runtime, debtor.account)
    assert summary["status"] == "bad_debt"
    assert any(r["rule"] == "bad_debt.payment_failed" for r in summary["reasons"])
    replay = pay(client, body, idem)
    assert (replay.status_code, replay.json) == (402, response.json)
    # The failed payment is no longer in flight: a new attempt (new key) may go ahead.
    stripe_fake.intent_outcome = "succeeded"
    assert pay(client, body, key()).status_code == 202


def test_a_stripe_server_error_is_a_502_and_the_payment_stays_in_flight_until_stripe_tells(client, engine, runtime,
                                                                                           debtor, stripe_fake):
    # Stripe: a 5xx's outcome is unknown, the charge may have run. Freeing the account would let a
    # second payment charge the customer twice.
    stripe_fake.intent_outcome = "server_error"
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert response.status_code == 502 and "APIError" in response.json["reason"]
    assert response.json["state"] == "pending" and response.json["error"] == "payment_outcome_unknown"
    [row] = payments(engine, debtor.account)
    assert row["state"] == "pending" and row["failure_reason"] is None
    assert recompute(engine, runtime, debtor.account, "BAD_DEBT_PAID")["status"] == "lifting"
    again = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert again.status_code == 409 and again.json["error"] == "payment_in_flight"


@pytest.mark.worker
def test_a_charge_that_went_through_behind_a_server_error_still_settles_the_debt(client, engine, debtor,
                                                                                stripe_fake, worker):
    stripe_fake.intent_outcome = "server_error_after_charge"
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert response.status_code == 502 and response.json["state"] == "pending"
    [intent] = stripe_fake.charged_behind_errors
    # The intent's webhook finds the payment by its metadata (the 500 gave no intent id).
    evt = intent_event("succeeded", debtor, intent["id"], response.json["payment_id"])
    assert post_event(client, evt).status_code == 200
    state = wait_for(lambda: (d := dunning_row(engine, debtor.account))["status"] == "current" and d,
                     message="out of bad debt")
    assert state["outstanding_amount"] == 0
    [row] = payments(engine, debtor.account)
    assert row["state"] == "succeeded" and row["stripe_payment_intent_id"] == intent["id"]


@pytest.mark.worker
def test_a_decline_after_a_recompute_ran_during_the_stripe_call_still_returns_the_account_to_bad_debt(
        client, engine, runtime, debtor, stripe_fake, worker):
    # Any recompute of the account while Stripe is being asked (support's button, a drift
    # remediation, beat's re-drive) takes the request the payment made and stores "lifting".
    stripe_fake.intent_outcome, stripe_fake.decline_code = "decline", "insufficient_funds"
    seen: list[str] = []
    stripe_fake.before_answer = lambda: seen.append(recompute(engine, runtime, debtor.account, "MANUAL")["status"])
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert response.status_code == 402 and seen == ["lifting"]
    state = wait_for(lambda: (d := dunning_row(engine, debtor.account))["status"] == "bad_debt" and d,
                     message="back in bad debt")
    assert any(r["rule"] == "bad_debt.payment_failed" for r in state["reasons"])


def test_a_decline_saved_while_its_webhook_is_being_stored_does_not_deadlock(engine, runtime, celery_app, debtor,
                                                                            stripe_fake):
    """Stripe's 402 and its payment_intent.payment_failed webhook at the same moment: saving the
    answer and storing the webhook lock the account's recompute request and the payment row. In
    opposite orders they deadlocked, the answer was lost, and every replay of the key said 409."""
    import json

    from app.db import unit_of_work
    from app.payments import bad_debt_webhook
    from app.payments.bad_debt import pay_bad_debt
    from webhooks import store
    from webhooks.mirror import extract

    stripe_fake.intent_outcome, stripe_fake.decline_code = "decline", "insufficient_funds"
    holding, go = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def webhook() -> None:  # what Ingestor._ingest_payment_outcome does, held between its two steps
        try:
            with engine.connect() as conn:
                payment_id = conn.exec_driver_sql("SELECT id FROM bad_debt_payment WHERE account_id = %(a)s",
                                                  {"a": debtor.account}).scalar_one()
            evt = intent_event("failed", debtor, "pi_declined", payment_id, decline="insufficient_funds")
            ex = extract(evt)
            with unit_of_work(engine) as conn:
                stored = store.ingest_events(conn, [(ex, json.dumps(evt))])[0]
                assert stored is not None and stored.account_id is not None and ex.payment_intent is not None
                holding.set()
                go.wait(20)
                bad_debt_webhook.record_outcome(conn, ex.type, stored.account_id, ex.payment_intent, evt)
        except BaseException as exc:
            errors.append(exc)

    def waiting_on_a_lock() -> bool:
        with engine.connect() as conn:
            return bool(conn.exec_driver_sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                             "AND datname = current_database()").scalar())

    def release_once_the_answer_waits() -> None:
        wait_for(waiting_on_a_lock, message="saving the answer to wait for the webhook's transaction")
        go.set()

    stored_webhook = threading.Thread(target=webhook)
    releaser = threading.Thread(target=release_once_the_answer_waits)

    def before_answer() -> None:
        stored_webhook.start()
        holding.wait(10)
        releaser.start()

    stripe_fake.before_answer = before_answer
    answer = pay_bad_debt(runtime, celery_app, {"account_id": debtor.account, "amount": debtor.amount}, key())
    stored_webhook.join(20)
    releaser.join(20)
    assert errors == [] and answer.status == 402
    [row] = payments(engine, debtor.account)
    assert row["state"] == "failed" and row["response_status"] == 402


def test_two_concurrent_requests_one_202_one_409(flask_app: Flask, engine, debtor, stripe_fake):
    body = {"account_id": debtor.account, "amount": debtor.amount}
    barrier = threading.Barrier(2)
    answers: list[tuple[int, dict[str, Any]]] = []

    def one() -> None:
        client = flask_app.test_client()
        barrier.wait()
        response = pay(client, body, key())
        answers.append((response.status_code, response.json))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(status for status, _ in answers) == [202, 409], answers
    refused = next(b for s, b in answers if s == 409)
    assert refused["error"] == "payment_in_flight" and refused["reason"]
    assert len(stripe_fake.intents_created()) == 1 and len(payments(engine, debtor.account)) == 1


# --- webhooks: the way out, and back ------------------------------------------------------------


@pytest.mark.worker
def test_the_success_webhook_settles_the_invoices_and_the_account_leaves_bad_debt(client, engine, debtor,
                                                                                stripe_fake, worker):
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert response.status_code == 202
    wait_for(lambda: dunning_row(engine, debtor.account)["status"] == "lifting", message="lifting")
    assert dunning_row(engine, debtor.account)["version"] >= 2

    evt = intent_event("succeeded", debtor, response.json["stripe_payment_intent_id"], response.json["payment_id"])
    assert post_event(client, evt).status_code == 200
    state = wait_for(lambda: (d := dunning_row(engine, debtor.account))["status"] == "current" and d,
                     message="out of bad debt")
    assert state["level"] == "none" and state["outstanding_amount"] == 0
    [row] = payments(engine, debtor.account)
    assert row["state"] == "succeeded"
    [paid] = stripe_fake.invoice_payments()
    assert paid.path == f"/v1/invoices/{debtor.invoice}/pay" and paid.params["paid_out_of_band"] == "true"
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT bad_debt FROM subs_account WHERE account_id = %(a)s",
                                    {"a": debtor.account}).scalar_one() is False
        episode = conn.exec_driver_sql("SELECT exited_at, exit_how FROM bad_debt_episode WHERE account_id = %(a)s",
                                       {"a": debtor.account}).mappings().one()
        assert episode["exited_at"] is not None and episode["exit_how"] == "paid"
    assert state["last_trigger"] == "BAD_DEBT_PAID"
    assert count(engine, "SELECT count(*) FROM payment_retry") == 0


@pytest.mark.worker
def test_the_failure_webhook_returns_the_account_to_bad_debt_with_the_reason(client, engine, debtor, stripe_fake,
                                                                           worker):
    stripe_fake.intent_outcome = "processing"  # Stripe decides later and tells by webhook
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert response.status_code == 202 and response.json["stripe_status"] == "processing"
    wait_for(lambda: dunning_row(engine, debtor.account)["status"] == "lifting", message="lifting")

    evt = intent_event("failed", debtor, response.json["stripe_payment_intent_id"], response.json["payment_id"],
                       decline="do_not_honor")
    assert post_event(client, evt).status_code == 200
    state = wait_for(lambda: (d := dunning_row(engine, debtor.account))["status"] == "bad_debt" and d,
                     message="back in bad debt")
    failed = [r for r in state["reasons"] if r["rule"] == "bad_debt.payment_failed"]
    assert failed and "do_not_honor" in failed[0]["facts"]["failure"]
    [row] = payments(engine, debtor.account)
    assert row["state"] == "failed" and row["failure_reason"] == "declined: do_not_honor"
    assert stripe_fake.invoice_payments() == []


@pytest.mark.worker
def test_an_intent_cancelled_at_stripe_returns_the_account_to_bad_debt_at_once(client, engine, debtor, stripe_fake,
                                                                             worker):
    """payment_intent.canceled (an operator cancelled the intent at Stripe) ends the payment with no
    money, as a decline does. It was stored and ignored: the account stayed lifting until the
    reconciliation past the 30-minute guard window."""
    stripe_fake.intent_outcome = "processing"
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    wait_for(lambda: dunning_row(engine, debtor.account)["status"] == "lifting", message="lifting")

    evt = intent_event("failed", debtor, response.json["stripe_payment_intent_id"], response.json["payment_id"])
    evt["type"] = "payment_intent.canceled"
    evt["data"]["object"].update(status="canceled", cancellation_reason="requested_by_customer",
                                 last_payment_error=None)
    assert post_event(client, evt).json["state"] == "accepted"
    wait_for(lambda: dunning_row(engine, debtor.account)["status"] == "bad_debt", message="back in bad debt")
    [row] = payments(engine, debtor.account)
    assert row["state"] == "failed" and row["failure_reason"] == "canceled: requested_by_customer"
    assert stripe_fake.invoice_payments() == []


def stuck_rows(engine: Engine, task: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.exec_driver_sql(
            "SELECT account_id, state, error, task_args FROM subs_stuck_events WHERE task_name = %(t)s ORDER BY id",
            {"t": task}).mappings()]


@pytest.mark.worker
def test_an_invoice_paid_elsewhere_while_the_payment_ran_is_flagged_as_paid_twice(client, engine, debtor,
                                                                                  stripe_fake, worker, celery_app):
    """A bank debit processing for days while the customer pays the same invoice on Stripe's hosted
    page: both collect. The debt is settled, and the double payment is put before an operator."""
    stripe_fake.intent_outcome = "processing"
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert response.status_code == 202
    stripe_fake.pay_elsewhere(debtor.invoice)
    paid = event("invoice.paid", id=debtor.invoice, customer=debtor.customer, amount_due=debtor.amount,
                 amount_paid=debtor.amount, amount_remaining=0)
    assert post_event(client, paid).status_code == 200
    evt = intent_event("succeeded", debtor, response.json["stripe_payment_intent_id"], response.json["payment_id"])
    assert post_event(client, evt).status_code == 200

    [flag] = wait_for(lambda: stuck_rows(engine, "tasks.bad_debt_overpayment_refunded"), message="a stuck row")
    assert flag["account_id"] == debtor.account and flag["state"] == "dead"
    assert flag["error"].startswith("overpaid:") and debtor.invoice in flag["error"]
    assert flag["task_args"] == {"payment_id": response.json["payment_id"]}
    wait_for(lambda: payments(engine, debtor.account)[0]["state"] == "succeeded", message="payment settled")

    # Another settlement of the account failing, then succeeding, leaves the alert alone.
    other = {"payment_id": response.json["payment_id"] + 1000}
    record_stuck(engine, "tasks.settle_bad_debt_payment", other, debtor.account, FailureKind.REMOTE_UNAVAILABLE,
                 "Stripe unavailable", 2, "retrying", per_args=True)
    resolve_stuck(engine, "tasks.settle_bad_debt_payment", debtor.account, other)
    assert stuck_rows(engine, "tasks.bad_debt_overpayment_refunded")[0]["state"] == "dead"
    # Refunded, the operator re-drives the alert: it is resolved.
    with engine.connect() as conn:
        stuck_id = conn.exec_driver_sql("SELECT id FROM subs_stuck_events WHERE task_name = %(t)s",
                                        {"t": "tasks.bad_debt_overpayment_refunded"}).scalar_one()
    assert redrive_one(engine, celery_app, stuck_id) is not None
    wait_for(lambda: stuck_rows(engine, "tasks.bad_debt_overpayment_refunded")[0]["state"] == "resolved",
             message="the alert resolved")


def test_one_payments_settlement_failure_is_not_anothers(engine, accounts):
    account, _ = accounts.create()
    for payment_id in (1, 2):
        record_stuck(engine, "tasks.settle_bad_debt_payment", {"payment_id": payment_id}, account,
                     FailureKind.REMOTE_UNAVAILABLE, f"payment {payment_id}: Stripe unavailable", 2, "retrying",
                     per_args=True)
    resolve_stuck(engine, "tasks.settle_bad_debt_payment", account, {"payment_id": 2})
    rows = {r["task_args"]["payment_id"]: r for r in stuck_rows(engine, "tasks.settle_bad_debt_payment")
            if r["account_id"] == account}
    assert (rows[1]["state"], rows[2]["state"]) == ("retrying", "resolved")
    assert rows[1]["error"].startswith("payment 1")


@pytest.mark.worker
def test_a_settlement_that_fails_is_recorded_under_its_account(client, engine, debtor, stripe_fake, worker):
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    stripe_fake.invoices.clear()  # Stripe knows no such invoice now: paying it out of band is refused
    evt = intent_event("succeeded", debtor, response.json["stripe_payment_intent_id"], response.json["payment_id"])
    assert post_event(client, evt).status_code == 200
    [row] = wait_for(lambda: stuck_rows(engine, "tasks.settle_bad_debt_payment"), message="a stuck row")
    assert row["account_id"] == debtor.account and row["state"] == "dead"
    assert payments(engine, debtor.account)[0]["state"] == "pending"


def test_a_duplicate_that_overlaps_the_first_request_is_told_it_is_in_progress(flask_app: Flask, engine, debtor,
                                                                              stripe_fake, monkeypatch):
    """The duplicate looks the key up before the first request commits its payment, and the debt
    after: it must hear "this request is in progress", not "another payment is in flight"."""
    import app.payments.bad_debt as bad_debt

    real_debt = bad_debt._debt
    duplicate_looked, first_inserted, release = threading.Event(), threading.Event(), threading.Event()

    def debt_after_the_first_insert(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "duplicate":
            duplicate_looked.set()
            first_inserted.wait(10)
        return real_debt(*args, **kwargs)

    monkeypatch.setattr(bad_debt, "_debt", debt_after_the_first_insert)

    def first_waits_on_stripe() -> None:
        first_inserted.set()
        release.wait(10)

    stripe_fake.before_answer = first_waits_on_stripe
    body, idem = {"account_id": debtor.account, "amount": debtor.amount}, key()
    answers: dict[str, Any] = {}

    def run(name: str) -> None:
        answers[name] = pay(flask_app.test_client(), body, idem)
        if name == "duplicate":
            release.set()

    duplicate = threading.Thread(target=run, args=("duplicate",), name="duplicate")
    duplicate.start()
    assert duplicate_looked.wait(10)
    first = threading.Thread(target=run, args=("first",), name="first")
    first.start()
    duplicate.join(20)
    first.join(20)
    assert answers["first"].status_code == 202
    assert (answers["duplicate"].status_code, answers["duplicate"].json["error"]) == (409, "request_in_progress")
    assert len(stripe_fake.intents_created()) == 1


def test_a_debt_in_two_currencies_is_refused_before_any_amount_is_quoted(client, engine, runtime, accounts,
                                                                        stripe_fake):
    account, customer = accounts.create()
    t = int(time.time()) - 30 * DAY
    for currency, amount in (("usd", 1000), ("eur", 700)):
        evt = with_product(event("invoice.marked_uncollectible", id=unique("in"), customer=customer, created=t,
                                 amount_due=amount, amount_remaining=amount, amount_paid=0, total=amount,
                                 currency=currency, paths={"created": t - DAY}), "prod_premium", amount)
        assert post_event(client, evt).status_code == 200
    card = event("customer.updated", id=customer, created=t,
                 paths={"invoice_settings.default_payment_method": unique("pm")})
    assert post_event(client, card).status_code == 200
    assert recompute(engine, runtime, account)["status"] == "bad_debt"
    for amount in (1000, 1700):  # neither is a balance: 10.00 USD and 7.00 EUR
        response = pay(client, {"account_id": account, "amount": amount}, key())
        assert (response.status_code, response.json["error"]) == (409, "mixed_debt")
        assert "outstanding_amount" not in response.json
    assert stripe_fake.intents_created() == []


def test_an_invoice_this_payment_paid_behind_a_server_error_is_no_overpayment(client, engine, runtime, debtor,
                                                                             stripe_fake):
    """Stripe paid the invoice out of band and answered 500: the settlement's own doing, not the
    customer paying twice (and the key would replay that 500 for 24 hours)."""
    from app.payments.bad_debt_settle import settle

    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    evt = intent_event("succeeded", debtor, response.json["stripe_payment_intent_id"], response.json["payment_id"])
    assert post_event(client, evt).status_code == 200
    stripe_fake.pay_outcome = "server_error_after_pay"
    settled = settle(runtime, response.json["payment_id"])
    assert (settled.outcome, settled.settled_elsewhere) == ("settled", ())
    assert payments(engine, debtor.account)[0]["state"] == "succeeded"


def test_a_settlement_retried_after_a_server_error_uses_a_new_key(client, engine, runtime, debtor, stripe_fake):
    """Stripe keeps a 5xx for its idempotency key: the retry must not be that replay, all day."""
    from app.payments.bad_debt_settle import settle

    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    evt = intent_event("succeeded", debtor, response.json["stripe_payment_intent_id"], response.json["payment_id"])
    assert post_event(client, evt).status_code == 200
    stripe_fake.pay_outcome = "server_error"  # not run: the invoice stays open
    with pytest.raises(stripe.APIError):
        settle(runtime, response.json["payment_id"])
    stripe_fake.pay_outcome = "paid"
    settled = settle(runtime, response.json["payment_id"])
    assert (settled.outcome, settled.settled_elsewhere) == ("settled", ())
    keys = [c.idempotency_key for c in stripe_fake.calls if c.path.endswith("/pay")]
    assert len(keys) == 2 and len(set(keys)) == 2


def charged_payment(client: FlaskClient, debtor: InBadDebt) -> int:
    """A bad-debt payment whose success webhook came in: ready to settle."""
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    evt = intent_event("succeeded", debtor, response.json["stripe_payment_intent_id"], response.json["payment_id"])
    assert post_event(client, evt).status_code == 200
    return int(response.json["payment_id"])


@pytest.mark.parametrize("refusal, error", [("server_error", stripe.APIError), ("rate_limited", stripe.RateLimitError)])
def test_an_invoice_paid_elsewhere_after_a_settlement_call_that_did_not_run_is_paid_twice(
        client, engine, runtime, debtor, stripe_fake, refusal, error):
    from app.payments.bad_debt_settle import settle

    payment_id = charged_payment(client, debtor)
    stripe_fake.pay_outcome = refusal  # nothing paid: the invoice is still open
    with pytest.raises(error):
        settle(runtime, payment_id)
    stripe_fake.pay_elsewhere(debtor.invoice)  # the customer pays on the hosted page meanwhile
    stripe_fake.pay_outcome = "paid"
    assert settle(runtime, payment_id).settled_elsewhere == (debtor.invoice,)


def test_an_invoice_paid_elsewhere_before_a_settlement_call_that_timed_out_is_paid_twice(
        client, engine, runtime, debtor, stripe_fake):
    from app.payments.bad_debt_settle import settle

    payment_id = charged_payment(client, debtor)
    stripe_fake.pay_elsewhere(debtor.invoice)
    stripe_fake.pay_outcome = "server_error"  # our call's outcome is unknown; the invoice was paid anyway
    settled = settle(runtime, payment_id)
    assert settled.settled_elsewhere == (debtor.invoice,)
    assert f"{money(debtor.amount, 'usd')} paid by the customer" in settled.details[0]  # 10.00 USD: major units
    # in the settlement's own transaction: a worker dying after it cannot lose the alert
    [alert] = stuck_rows(engine, "tasks.bad_debt_overpayment_refunded")
    assert alert["account_id"] == debtor.account and alert["task_args"] == {"payment_id": payment_id}


def test_an_invoice_partly_paid_elsewhere_is_paid_twice_for_that_part(client, engine, runtime, debtor,
                                                                       stripe_fake):
    from app.payments.bad_debt_settle import settle

    payment_id = charged_payment(client, debtor)
    stripe_fake.pay_elsewhere(debtor.invoice, amount=400)  # the invoice stays open: 600 remain
    settled = settle(runtime, payment_id)
    assert settled.settled_elsewhere == (debtor.invoice,) and "4.00 USD paid by the customer" in settled.details[0]
    [alert] = stuck_rows(engine, "tasks.bad_debt_overpayment_refunded")
    assert "4.00 USD" in alert["error"]


def test_a_call_that_timed_out_and_ran_later_is_no_overpayment(client, engine, runtime, debtor, stripe_fake):
    """Our call paid the invoice after we gave up on its answer: the retry finds it paid, and
    Stripe shows no payment of the customer's on it."""
    from app.payments.bad_debt_settle import settle

    payment_id = charged_payment(client, debtor)
    stripe_fake.pay_outcome = "server_error"
    with pytest.raises(stripe.APIError):
        settle(runtime, payment_id)
    stripe_fake.pay_outcome = "paid"
    stripe_fake.handle("POST", f"/v1/invoices/{debtor.invoice}/pay", None, {"paid_out_of_band": "true"})
    settled = settle(runtime, payment_id)
    assert (settled.outcome, settled.settled_elsewhere) == ("settled", ())
    assert stuck_rows(engine, "tasks.bad_debt_overpayment_refunded") == []


def test_one_settlement_of_an_account_at_a_time(client, engine, runtime, debtor, stripe_fake):
    """Two settlements together would each find the invoice the other paid: 'paid twice'."""
    from app.db import session_lock
    from app.payments.bad_debt_settle import settle

    payment_id = charged_payment(client, debtor)
    with session_lock(engine, f"bad_debt_settle:{debtor.account}") as got:
        assert got
        assert settle(runtime, payment_id).outcome == "busy"
    assert stripe_fake.invoice_payments() == []
    settled = settle(runtime, payment_id)
    assert (settled.outcome, settled.settled_elsewhere) == ("settled", ())


def test_a_redriven_settlement_that_finds_another_running_stays_stuck_until_it_runs(client, engine, debtor,
                                                                                      stripe_fake, celery_app,
                                                                                      settings):
    """Re-driven by an operator while another settlement of the account runs: it sends itself again
    for later, so its row is not resolved yet; the later run, which settles, resolves it."""
    from app.db import session_lock
    from app.stuck_work import stuck_id_of, task_id_for
    from tasks import stuck  # noqa: F401  a re-driven task's success resolves its row
    from tasks.bad_debt import SETTLE

    payment_id = charged_payment(client, debtor)
    record_stuck(engine, SETTLE, {"payment_id": payment_id}, debtor.account, FailureKind.REMOTE_UNAVAILABLE,
                 "Stripe unavailable", 5, "retrying", per_args=True)
    with engine.connect() as conn:
        stuck_id = conn.exec_driver_sql("SELECT id FROM subs_stuck_events WHERE task_name = %(t)s",
                                        {"t": SETTLE}).scalar_one()
    take_queued(settings, SETTLE)  # the webhook's
    task = celery_app.tasks[SETTLE]
    with session_lock(engine, f"bad_debt_settle:{debtor.account}") as got:
        assert got
        assert task.apply(kwargs={"payment_id": payment_id}, task_id=task_id_for(stuck_id)).get()["outcome"] == "busy"
    assert stuck_rows(engine, SETTLE)[0]["state"] == "retrying"
    [(again, args)] = take_queued(settings, SETTLE)
    assert args == [payment_id] and stuck_id_of(again) == stuck_id  # the later run still speaks for the row

    assert task.apply([payment_id], task_id=again).get()["outcome"] == "settled"
    assert stuck_rows(engine, SETTLE)[0]["state"] == "resolved"


def test_a_settlement_retry_that_finds_another_running_is_resolved_by_the_run_that_settles(
        client, engine, debtor, stripe_fake, celery_app, settings):
    """Its own retries (after failures that wrote its stuck row) found the account busy: the run it
    sends for later is a new task, and when it settles the payment its row is resolved, not left
    'retrying' for beat to re-drive a settled payment."""
    from app.db import session_lock
    from tasks.bad_debt import SETTLE

    payment_id = charged_payment(client, debtor)
    record_stuck(engine, SETTLE, {"payment_id": payment_id}, debtor.account, FailureKind.REMOTE_UNAVAILABLE,
                 "Stripe unavailable", 2, "retrying", per_args=True)
    take_queued(settings, SETTLE)  # the webhook's
    task = celery_app.tasks[SETTLE]
    with session_lock(engine, f"bad_debt_settle:{debtor.account}") as got:
        assert got
        assert task.apply([payment_id], retries=2).get()["outcome"] == "busy"
    [(later, args)] = take_queued(settings, SETTLE)
    assert task.apply(args, {"waited": 1}, task_id=later).get()["outcome"] == "settled"
    assert stuck_rows(engine, SETTLE)[0]["state"] == "resolved"


def test_an_invoice_paid_in_part_before_the_quote_is_not_paid_twice(client, engine, runtime, accounts, stripe_fake):
    """400 of 1000 paid by the customer weeks before the debt, the quote 600: paid once."""
    from app.payments.bad_debt_settle import settle

    debt = earlier_payment_of_400(client, engine, runtime, accounts, stripe_fake)
    assert debt.amount == 600
    payment_id = charged_payment(client, debt)
    settled = settle(runtime, payment_id)
    assert (settled.outcome, settled.settled_elsewhere) == ("settled", ())
    # and 300 more paid by the customer while the payment ran is paid twice, for those 300
    debt2 = earlier_payment_of_400(client, engine, runtime, accounts, stripe_fake)
    second = charged_payment(client, debt2)
    stripe_fake.pay_elsewhere(debt2.invoice, amount=300)
    settled = settle(runtime, second)
    assert settled.settled_elsewhere == (debt2.invoice,) and "3.00 USD paid by the customer" in settled.details[0]


def test_an_earlier_payment_recorded_out_of_band_does_not_hide_a_card_payment(client, engine, runtime, accounts,
                                                                              stripe_fake):
    """400 recorded earlier as a bank transfer (no payment of the customer's at Stripe), the quote
    600, then the customer pays 300 by card while the payment runs: 300 paid twice."""
    from app.payments.bad_debt_settle import settle

    debt = into_bad_debt(client, engine, runtime, accounts, amount=1000, paid=400)
    stripe_fake.add_invoice(debt.invoice_object)
    payment_id = charged_payment(client, debt)
    stripe_fake.pay_elsewhere(debt.invoice, amount=300)
    settled = settle(runtime, payment_id)
    assert settled.settled_elsewhere == (debt.invoice,) and "3.00 USD paid by the customer" in settled.details[0]


def earlier_payment_of_400(client: FlaskClient, engine: Engine, runtime: Any, accounts: Any,
                           stripe_fake: Any) -> InBadDebt:
    """An invoice of 1000, 400 of it paid by the customer's card weeks ago (Stripe lists the
    payment, and its invoice_payment.paid is in the mirror), the rest in bad debt."""
    debt = into_bad_debt(client, engine, runtime, accounts, amount=1000, paid=400)
    stripe_fake.add_invoice({**debt.invoice_object, "amount_paid": 0, "amount_remaining": 1000})
    stripe_fake.pay_elsewhere(debt.invoice, amount=400)
    [earlier] = stripe_fake.payments_by_invoice[debt.invoice]
    intent = earlier["payment"]["payment_intent"]
    link = event("invoice_payment.paid", invoice=debt.invoice, amount_paid=400, amount_requested=400,
                 created=int(time.time()) - 20 * DAY, paths={"payment.payment_intent": intent})
    assert post_event(client, link).status_code == 200
    return debt


def test_a_charge_refunded_after_settlement_is_put_before_an_operator(client, engine, runtime, debtor, stripe_fake,
                                                                      celery_app):
    """The invoices were paid out of band with the customer's money, which then went back: the
    debt is cleared with nothing in. Stripe cannot reopen a paid invoice, so an operator decides
    (bill it again, or let it go), once per payment, and re-drives the alert when done."""
    from app.payments.bad_debt_settle import settle
    from app.stuck_work import task_id_for
    from tasks import stuck  # noqa: F401  a re-driven task's success resolves its row
    from tasks.bad_debt import REFUNDED_AFTER_SETTLEMENT

    payment_id = charged_payment(client, debtor)
    assert settle(runtime, payment_id).outcome == "settled"
    intent = payments(engine, debtor.account)[0]["stripe_payment_intent_id"]
    refund(client, debtor, intent, amount=300)
    refund(client, debtor, intent)  # the rest too: still one alert
    [alert] = stuck_rows(engine, REFUNDED_AFTER_SETTLEMENT)
    assert (alert["account_id"], alert["state"], alert["task_args"]) == (debtor.account, "dead",
                                                                         {"payment_id": payment_id})
    assert alert["error"].startswith("refunded after settlement:") and debtor.invoice in alert["error"]
    assert payments(engine, debtor.account)[0]["state"] == "succeeded"  # what happened stays recorded

    with engine.connect() as conn:
        stuck_id = conn.exec_driver_sql("SELECT id FROM subs_stuck_events WHERE task_name = %(t)s",
                                        {"t": REFUNDED_AFTER_SETTLEMENT}).scalar_one()
    celery_app.tasks[REFUNDED_AFTER_SETTLEMENT].apply([payment_id], task_id=task_id_for(stuck_id)).get()
    assert stuck_rows(engine, REFUNDED_AFTER_SETTLEMENT)[0]["state"] == "resolved"


def test_the_open_alert_of_a_refund_after_settlement_names_the_most_refunded_so_far(client, engine, runtime, debtor,
                                                                                   stripe_fake):
    """Refunded in part after settlement (the alert names the part), then in full while the alert is
    still open: still one alert, but it must say the whole payment went back. It kept the first
    refund's amount, and an operator billing that part again let the rest of the debt go with
    nothing in. A late delivery of the earlier, smaller refund does not bring the amount back."""
    from app.payments.bad_debt_settle import settle
    from tasks.bad_debt import REFUNDED_AFTER_SETTLEMENT

    payment_id = charged_payment(client, debtor)
    assert settle(runtime, payment_id).outcome == "settled"
    intent = payments(engine, debtor.account)[0]["stripe_payment_intent_id"]
    part = money(300, "usd")
    refund(client, debtor, intent, amount=300)
    [alert] = stuck_rows(engine, REFUNDED_AFTER_SETTLEMENT)
    assert f"refunded ({part})" in alert["error"]
    refund(client, debtor, intent)  # the rest too
    refund(client, debtor, intent, amount=300)  # the first refund's event again, delivered late
    [alert] = stuck_rows(engine, REFUNDED_AFTER_SETTLEMENT)
    assert f"refunded ({money(debtor.amount, 'usd')})" in alert["error"], alert["error"]
    assert alert["error"].startswith("refunded after settlement:") and alert["state"] == "dead"


def test_a_charge_refunded_while_its_settlement_pays_the_invoices_is_put_before_an_operator(client, engine, runtime,
                                                                                          debtor, stripe_fake):
    """The refund's webhook comes in while the settlement is paying the invoices out of band: it sees
    the payment still pending (settlement's to judge) and settlement read the charge before it. The
    invoices are paid all the same, so the debt is cleared with the money gone back: the same alert
    as a refund after settlement."""
    from app.payments.bad_debt_settle import settle
    from tasks.bad_debt import REFUNDED_AFTER_SETTLEMENT

    payment_id = charged_payment(client, debtor)
    intent = payments(engine, debtor.account)[0]["stripe_payment_intent_id"]

    def refunded_meanwhile() -> None:
        stripe_fake.before_paying = None
        refund(client, debtor, intent)

    stripe_fake.before_paying = refunded_meanwhile
    assert settle(runtime, payment_id).outcome == "settled"
    assert stripe_fake.before_paying is None  # the refund came in while Stripe paid the invoice
    [alert] = stuck_rows(engine, REFUNDED_AFTER_SETTLEMENT)
    assert (alert["account_id"], alert["state"], alert["task_args"]) == (debtor.account, "dead",
                                                                         {"payment_id": payment_id})
    assert alert["error"].startswith("refunded after settlement:") and debtor.invoice in alert["error"]
    assert payments(engine, debtor.account)[0]["state"] == "succeeded"
    refund(client, debtor, intent)  # Stripe redelivers the refund: still one alert
    assert len(stuck_rows(engine, REFUNDED_AFTER_SETTLEMENT)) == 1


def test_a_charge_refunded_before_settlement_settles_nothing(client, engine, runtime, debtor, stripe_fake):
    from app.payments.bad_debt_settle import settle

    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    intent = response.json["stripe_payment_intent_id"]
    assert post_event(client, intent_event("succeeded", debtor, intent, response.json["payment_id"])).status_code == 200
    refund(client, debtor, intent)
    settled = settle(runtime, response.json["payment_id"])
    assert settled.outcome == "refunded" and stripe_fake.invoice_payments() == []
    [row] = payments(engine, debtor.account)
    assert row["state"] == "failed" and row["failure_reason"].startswith("refunded")
    assert recompute(engine, runtime, debtor.account)["status"] == "bad_debt"
    assert stuck_rows(engine, "tasks.bad_debt_overpayment_refunded") == []  # all of it went back


def test_a_charge_refunded_in_part_before_settlement_leaves_the_rest_owed_to_the_customer(
        client, engine, runtime, debtor, stripe_fake):
    from app.payments.bad_debt_settle import settle

    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    intent = response.json["stripe_payment_intent_id"]
    assert post_event(client, intent_event("succeeded", debtor, intent, response.json["payment_id"])).status_code == 200
    refund(client, debtor, intent, amount=100)
    assert settle(runtime, response.json["payment_id"]).outcome == "refunded"
    assert payments(engine, debtor.account)[0]["state"] == "failed"
    [alert] = stuck_rows(engine, "tasks.bad_debt_overpayment_refunded")
    assert alert["account_id"] == debtor.account
    assert f"owed the other {money(debtor.amount - 100, 'usd')}" in alert["error"]  # 9.00 USD: major units


def test_a_refunded_charge_does_not_take_a_freed_slot(client, engine, runtime, debtor, stripe_fake):
    """A failed payment whose charge turned up, then was refunded, while a second one was in flight:
    when the second one is declined, nothing of the first is in."""
    stripe_fake.intent_outcome = "decline"
    first = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key()).json
    stripe_fake.intent_outcome = "processing"
    second = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key()).json
    declined_intent = payments(engine, debtor.account)[0]["stripe_payment_intent_id"]
    late = intent_event("succeeded", debtor, declined_intent, first["payment_id"])  # Stripe confirmed it again
    assert post_event(client, late).status_code == 200
    refund(client, debtor, late["data"]["object"]["id"])
    declined = intent_event("failed", debtor, second["stripe_payment_intent_id"], second["payment_id"],
                            decline="insufficient_funds")
    assert post_event(client, declined).status_code == 200
    assert [p["state"] for p in payments(engine, debtor.account)] == ["failed", "failed"]


@pytest.mark.worker
def test_a_settlement_that_finds_another_running_comes_back_after_it(client, engine, debtor, stripe_fake, worker,
                                                                     celery_app):
    from app.db import session_lock

    with session_lock(engine, f"bad_debt_settle:{debtor.account}") as got:  # another settlement of the account
        assert got
        payment_id = charged_payment(client, debtor)  # its webhook queues a settlement too
        waiting = celery_app.send_task("tasks.settle_bad_debt_payment", [payment_id])
        assert waiting.get(timeout=20)["outcome"] == "busy"  # and it sent itself again, for 5 s later
        assert payments(engine, debtor.account)[0]["state"] == "pending"
    wait_for(lambda: payments(engine, debtor.account)[0]["state"] == "succeeded", message="settled after it")


def test_a_quote_stripe_cannot_confirm_charges_nothing(client, engine, debtor, stripe_fake):
    """The customer's payments on the invoices are read from Stripe before anything is charged."""
    stripe_fake.invoice_payments_down = True
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert (response.status_code, response.json["error"]) == (502, "payment_provider_error")
    assert payments(engine, debtor.account) == [] and stripe_fake.intents_created() == []


def test_an_invoice_paid_at_stripe_before_the_mirror_heard_of_it_is_not_charged_again(client, engine, debtor,
                                                                                        stripe_fake):
    """The customer paid on the hosted page a moment ago; its webhooks are not in yet, so the mirror
    still quotes the whole balance. Stripe's own record is read before anything is charged."""
    stripe_fake.pay_elsewhere(debtor.invoice)
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert (response.status_code, response.json["error"]) == (409, "balance_changing")
    assert payments(engine, debtor.account) == [] and stripe_fake.intents_created() == []


def test_an_invoice_closed_by_someone_else_before_settlement_is_put_before_an_operator(client, engine, runtime,
                                                                                        debtor, stripe_fake):
    """Support marked it paid (a bank transfer) while the payment ran: no payment of the customer's
    at Stripe, yet the charge covered it too."""
    from app.payments.bad_debt_settle import settle

    payment_id = charged_payment(client, debtor)
    stripe_fake.invoices[debtor.invoice].update(status="paid", amount_remaining=0)
    settled = settle(runtime, payment_id)
    assert settled.settled_elsewhere == (debtor.invoice,) and "closed some other way" in settled.details[0]


def test_a_refund_after_invoices_were_paid_out_of_band_is_put_before_an_operator(client, engine, runtime, debtor,
                                                                                 stripe_fake):
    """A settlement paid the invoice, then failed before it committed; the charge was refunded
    meanwhile: the invoice is closed with no money in."""
    from app.payments.bad_debt_settle import settle

    payment_id = charged_payment(client, debtor)
    stripe_fake.invoice_payments_down = True  # the run fails after its out-of-band pay
    with pytest.raises(stripe.APIError):
        settle(runtime, payment_id)
    assert stripe_fake.invoices[debtor.invoice]["status"] == "paid"
    stripe_fake.invoice_payments_down = False
    refund(client, debtor, payments(engine, debtor.account)[0]["stripe_payment_intent_id"])
    assert settle(runtime, payment_id).outcome == "refunded"
    [alert] = stuck_rows(engine, "tasks.bad_debt_overpayment_refunded")
    assert f"{debtor.invoice} may have been paid out of band already" in alert["error"]


def test_a_settlement_refused_for_good_is_not_swept_again_ahead_of_the_others(client, engine, runtime, debtor,
                                                                              stripe_fake):
    from app.payments.bad_debt_settle import unsettled

    payment_id = charged_payment(client, debtor)
    assert payment_id in unsettled(runtime, older_than_seconds=0)
    record_stuck(engine, "tasks.settle_bad_debt_payment", {"payment_id": payment_id}, debtor.account,
                 FailureKind.PERMANENT_API_ERROR, "NotSettled: Stripe refused", 1, "dead", per_args=True)
    assert payment_id not in unsettled(runtime, older_than_seconds=0)


@pytest.mark.worker
def test_a_refund_that_leaves_money_owed_counts_as_an_overpayment(client, engine, debtor, stripe_fake, worker):
    from prometheus_client import REGISTRY

    before = REGISTRY.get_sample_value("dunning_bad_debt_overpaid_total") or 0
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    intent = response.json["stripe_payment_intent_id"]
    refund(client, debtor, intent, amount=100)  # Stripe sends the two in no set order
    assert post_event(client, intent_event("succeeded", debtor, intent, response.json["payment_id"])).status_code == 200
    wait_for(lambda: stuck_rows(engine, "tasks.bad_debt_overpayment_refunded"), message="the alert")
    wait_for(lambda: (REGISTRY.get_sample_value("dunning_bad_debt_overpaid_total") or 0) == before + 1,
             message="counted")


def test_an_invoice_voided_at_stripe_before_its_webhook_came_is_not_charged(client, engine, debtor, stripe_fake):
    """The business voided the invoice at Stripe a moment ago and invoice.voided is not in yet.
    Stripe keeps a void invoice's amount_remaining (only its status changes), so the check of what
    Stripe's invoices still owe must look at their status too: 409, nothing charged."""
    stripe_fake.invoices[debtor.invoice]["status"] = "void"
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert (response.status_code, response.json["error"]) == (409, "balance_changing")
    assert f"{debtor.invoice} is void" in response.json["reason"]
    assert stripe_fake.intents_created() == []
    assert payments(engine, debtor.account) == []


def test_a_debt_paid_by_a_concurrent_request_with_another_key_is_not_charged_again(
        client, engine, runtime, debtor, stripe_fake, monkeypatch):
    """Request A is quoted and asks Stripe about the invoices; meanwhile request B (another key) is
    charged, its success webhook comes and its settlement pays the debt, so B is no longer in flight
    when A writes its payment. A must see B under the account's payment lock: 409, one charge."""
    from app.payments import bad_debt
    from app.payments.bad_debt_settle import settle

    body = {"account_id": debtor.account, "amount": debtor.amount}
    insert = bad_debt._insert
    others: list[str] = []

    def another_request_pays_first(rt, req, debt):
        if not others:  # B runs between A's quote and A's insert (A's own call, once)
            others.append("B")
            first = pay(client, body, key())
            assert first.status_code == 202, first.json
            paid = intent_event("succeeded", debtor, first.json["stripe_payment_intent_id"], first.json["payment_id"])
            assert post_event(client, paid).status_code == 200
            assert settle(runtime, first.json["payment_id"]).outcome == "settled"
        return insert(rt, req, debt)

    monkeypatch.setattr(bad_debt, "_insert", another_request_pays_first)
    response = pay(client, body, key())
    assert (response.status_code, response.json["error"]) == (409, "balance_changing"), response.json
    assert len(stripe_fake.intents_created()) == 1
    assert [p["state"] for p in payments(engine, debtor.account)] == ["succeeded"]
