"""A bad-debt payment whose outcome never arrived is settled by asking Stripe (the fake, over HTTP)."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from app.payments import bad_debt
from app.payments.bad_debt_reconcile import due, reconcile
from tasks.bad_debt import RECONCILE, SETTLE  # registers the tasks
from tests.conftest import post_event, wait_for
from tests.integration.bad_debt_setup import (
    dunning_row,
    intent_event,
    key,
    pay,
    payments,
    recompute,
    refund,
    take_queued,
    take_queued_settlements,
)

LATER = timedelta(minutes=31)  # past the default 30-minute guard window


def backdate(engine: Engine, payment_id: int, by: timedelta) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE bad_debt_payment SET created_at = created_at - %(by)s WHERE id = %(id)s",
                             {"by": by, "id": payment_id})


def test_only_payments_pending_past_the_guard_window_are_checked_each_in_turn(client, engine, runtime, debtor,
                                                                              stripe_fake):
    stripe_fake.intent_outcome = "processing"
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    payment_id = response.json["payment_id"]
    now = datetime.now(UTC)
    assert payment_id not in due(runtime, now)  # its request may still be waiting on Stripe
    assert payment_id in due(runtime, now + LATER)
    assert payment_id not in due(runtime, now + LATER + timedelta(minutes=4))  # next check in 5 minutes
    assert payment_id in due(runtime, now + LATER + timedelta(minutes=5))
    assert payment_id not in due(runtime, now + LATER + timedelta(minutes=14))  # then in 10
    assert payment_id in due(runtime, now + LATER + timedelta(minutes=15))


def test_an_intent_stripe_never_created_fails_the_payment_after_two_checks(client, engine, runtime, debtor,
                                                                           stripe_fake):
    stripe_fake.intent_outcome = "server_error"  # a 500, and nothing was charged
    idem = key()
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, idem)
    assert (response.status_code, response.json["state"]) == (502, "pending")
    payment_id, now = response.json["payment_id"], datetime.now(UTC)

    first = reconcile(runtime, payment_id, now + LATER)
    assert first.outcome == "not_found_once"  # a listing that missed it once proves little
    assert payments(engine, debtor.account)[0]["state"] == "pending"
    second = reconcile(runtime, payment_id, now + LATER + timedelta(minutes=5))
    assert second.outcome == "failed"
    [row] = payments(engine, debtor.account)
    assert row["state"] == "failed" and row["failure_reason"].startswith("not charged")
    listed = [c for c in stripe_fake.calls if c.method == "GET" and c.path.startswith("/v1/payment_intents")]
    assert len(listed) == 2 and all(f"customer={debtor.customer}" in c.path for c in listed)
    assert len(stripe_fake.intents_created()) == 1  # the create was never sent again

    replay = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, idem)
    assert (replay.status_code, replay.json["state"]) == (402, "failed")  # "unknown" is known now
    state = recompute(engine, runtime, debtor.account)
    assert state["status"] == "bad_debt"
    assert "bad_debt.payment_failed" in [r["rule"] for r in dunning_row(engine, debtor.account)["reasons"]]
    again = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert again.status_code == 502  # a new payment may start (the fake still answers 500)


@pytest.mark.worker
def test_a_charge_behind_a_server_error_is_found_by_beat_and_settles_the_debt(client, engine, runtime, debtor,
                                                                            stripe_fake, worker, celery_app):
    stripe_fake.intent_outcome = "server_error_after_charge"
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert (response.status_code, response.json["state"]) == (502, "pending")
    wait_for(lambda: dunning_row(engine, debtor.account)["status"] == "lifting", message="lifting")
    backdate(engine, response.json["payment_id"], LATER)  # no webhook ever came

    celery_app.send_task("tasks.reconcile_bad_debt_payments")
    state = wait_for(lambda: (d := dunning_row(engine, debtor.account))["status"] == "current" and d,
                     message="out of bad debt")
    assert state["outstanding_amount"] == 0
    [row] = payments(engine, debtor.account)
    assert row["state"] == "succeeded"
    assert row["stripe_payment_intent_id"] == stripe_fake.charged_behind_errors[0]["id"]
    assert [c.path for c in stripe_fake.invoice_payments()] == [f"/v1/invoices/{debtor.invoice}/pay"]


def test_a_reconciliation_that_succeeds_resolves_the_row_an_earlier_one_gave_up(client, engine, runtime, debtor,
                                                                              stripe_fake, celery_app):
    """A check that gave up (dead, for an operator) and a later one beat sent afresh that succeeds:
    the row is resolved. It stayed dead, the payment long settled, because only a retry of the
    same task resolved it."""
    from tasks.failures import FailureKind, record_stuck

    stripe_fake.intent_outcome = "server_error_after_charge"
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    payment_id = response.json["payment_id"]
    backdate(engine, payment_id, LATER)
    args = {"payment_id": payment_id}
    assert record_stuck(engine, RECONCILE, args, debtor.account, FailureKind.PERMANENT_API_ERROR,
                        "StripeError: an earlier check", 1, "dead", per_args=True)

    result = celery_app.tasks[RECONCILE].apply(args=[payment_id])  # beat's next check: no retries of its own
    assert result.successful(), result.traceback
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT state FROM subs_stuck_events WHERE task_name = %(t)s AND account_id = %(a)s",
            {"t": RECONCILE, "a": debtor.account}).scalars().all()
    assert rows == ["resolved"]


def test_a_processing_intent_is_left_until_stripe_decides(client, engine, runtime, debtor, stripe_fake):
    stripe_fake.intent_outcome = "processing"
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    payment_id, intent = response.json["payment_id"], response.json["stripe_payment_intent_id"]
    now = datetime.now(UTC)
    assert reconcile(runtime, payment_id, now + LATER).outcome == "processing"
    [row] = payments(engine, debtor.account)
    assert (row["state"], row["stripe_status"]) == ("pending", "processing")

    stripe_fake.set_status(intent, "requires_payment_method", decline_code="do_not_honor")  # the debit bounced
    assert reconcile(runtime, payment_id, now + LATER * 2).outcome == "failed"
    [row] = payments(engine, debtor.account)
    assert (row["state"], row["failure_reason"]) == ("failed", "declined: do_not_honor")


def test_an_intent_waiting_for_an_absent_customer_is_cancelled_then_failed(client, engine, runtime, debtor,
                                                                           stripe_fake):
    stripe_fake.intent_outcome = "processing"
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    payment_id, intent = response.json["payment_id"], response.json["stripe_payment_intent_id"]
    stripe_fake.set_status(intent, "requires_action")  # 3-D Secure, off session: nobody will complete it
    assert reconcile(runtime, payment_id, datetime.now(UTC) + LATER).outcome == "failed"
    [cancel] = [c for c in stripe_fake.calls if c.path == f"/v1/payment_intents/{intent}/cancel"]
    assert cancel.idempotency_key == f"bad-debt-reconcile-cancel-{payment_id}-0"
    assert stripe_fake.intents[intent]["status"] == "canceled"
    assert payments(engine, debtor.account)[0]["state"] == "failed"


def test_a_payment_that_ended_meanwhile_is_not_touched(client, engine, runtime, debtor, stripe_fake):
    stripe_fake.intent_outcome = "decline"
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert response.status_code == 402
    calls = len(stripe_fake.calls)
    assert reconcile(runtime, response.json["payment_id"], datetime.now(UTC) + LATER).outcome == "already_done"
    assert len(stripe_fake.calls) == calls


def test_an_unexpected_error_asking_stripe_leaves_the_payment_in_flight_not_lost(client, engine, runtime, debtor,
                                                                                  stripe_fake, monkeypatch):
    def breaks(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug on the way to Stripe")

    monkeypatch.setattr(bad_debt, "_create_intent", breaks)
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert (response.status_code, response.json["error"], response.json["state"]) == (
        502, "payment_outcome_unknown", "pending")
    assert payments(engine, debtor.account)[0]["state"] == "pending"


def test_a_request_that_died_before_saving_stripes_answer_is_answered_once_reconciled(
        client, engine, runtime, debtor, stripe_fake):
    """The database failed between committing the payment and saving Stripe's answer: the key
    answered 'in progress' and the account stayed lifting, for ever."""
    stripe_fake.intent_outcome = "server_error"
    body, idem = {"account_id": debtor.account, "amount": debtor.amount}, key()
    with pytest.MonkeyPatch.context() as saving:
        saving.setattr(bad_debt, "SAVE_ANSWER", "UPDATE bad_debt_payment SET no_such_column = 1")
        assert pay(client, body, idem).status_code == 502  # Stripe's answer, said though not saved
    assert pay(client, body, idem).json["error"] == "request_in_progress"
    [row] = payments(engine, debtor.account)
    now = datetime.now(UTC)
    reconcile(runtime, row["id"], now + LATER)
    assert reconcile(runtime, row["id"], now + LATER + timedelta(minutes=5)).outcome == "failed"

    replay = pay(client, body, idem)
    assert (replay.status_code, replay.json["state"], replay.json["error"]) == (402, "failed", "payment_failed")
    assert replay.json["reason"].startswith("not charged") and replay.json["payment_id"] == row["id"]


def failed_with_a_hidden_charge(client: Any, engine: Engine, runtime: Any, debtor: Any,
                                stripe_fake: Any) -> tuple[int, dict[str, Any]]:
    """A payment whose create answered 500 but charged, failed by the reconciliation because
    Stripe's listing did not show its intent at either check (the account back in bad debt, as the
    task's recompute would make it): (its id, the intent Stripe holds all the same)."""
    stripe_fake.intent_outcome = "server_error_after_charge"
    payment_id = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key()).json["payment_id"]
    now = datetime.now(UTC)
    listed = stripe_fake.intents.copy()
    stripe_fake.intents.clear()
    reconcile(runtime, payment_id, now + LATER)
    assert reconcile(runtime, payment_id, now + LATER + timedelta(minutes=5)).outcome == "failed"
    assert recompute(engine, runtime, debtor.account)["status"] == "bad_debt"
    stripe_fake.intents.update(listed)
    [charged] = stripe_fake.charged_behind_errors
    return payment_id, charged


@pytest.mark.worker
def test_a_charge_that_turns_up_after_its_payment_was_failed_still_pays_the_debt(client, engine, runtime, debtor,
                                                                                stripe_fake, worker):
    payment_id, charged = failed_with_a_hidden_charge(client, engine, runtime, debtor, stripe_fake)
    evt = intent_event("succeeded", debtor, charged["id"], payment_id)
    assert post_event(client, evt).status_code == 200
    state = wait_for(lambda: (d := dunning_row(engine, debtor.account))["status"] == "current" and d,
                     message="out of bad debt")
    assert state["outstanding_amount"] == 0
    assert payments(engine, debtor.account)[0]["state"] == "succeeded"
    assert len(stripe_fake.invoice_payments()) == 1


def test_a_failed_payment_whose_charge_turns_up_is_in_flight_until_settled(client, engine, runtime, debtor,
                                                                           stripe_fake):
    """Between the late success and its settlement the money is taken: the account must be lifting,
    and a second payment of the same debt refused."""
    payment_id, charged = failed_with_a_hidden_charge(client, engine, runtime, debtor, stripe_fake)
    assert post_event(client, intent_event("succeeded", debtor, charged["id"], payment_id)).status_code == 200
    assert payments(engine, debtor.account)[0]["state"] == "pending"
    assert recompute(engine, runtime, debtor.account)["status"] == "lifting"
    stripe_fake.intent_outcome = "succeeded"
    second = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert (second.status_code, second.json["error"]) == (409, "payment_in_flight")
    assert len(stripe_fake.intents_created()) == 1


def test_a_late_success_and_a_new_payment_at_the_same_moment_do_not_deadlock(flask_app, client, engine, runtime,
                                                                             debtor, stripe_fake, monkeypatch):
    """The late success of a failed payment holds the account's recompute request (its ingest
    statement) when a new payment comes: the new one waits for it, as both take the request row
    first, and then finds the reopened payment in flight."""
    from app.payments import bad_debt_webhook

    failed_id, charged = failed_with_a_hidden_charge(client, engine, runtime, debtor, stripe_fake)
    stripe_fake.intent_outcome = "succeeded"

    real = bad_debt_webhook.record_outcome
    stored, go_on = threading.Event(), threading.Event()

    def hold_then_record(*args: Any, **kwargs: Any) -> Any:
        stored.set()  # the ingest statement ran: the request row is held
        go_on.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(bad_debt_webhook, "record_outcome", hold_then_record)
    answers: dict[str, Any] = {}

    def late_success() -> None:
        evt = intent_event("succeeded", debtor, charged["id"], failed_id)
        answers["webhook"] = post_event(flask_app.test_client(), evt)

    def new_payment() -> None:
        stored.wait(10)
        answers["pay"] = pay(flask_app.test_client(), {"account_id": debtor.account, "amount": debtor.amount}, key())

    threads = [threading.Thread(target=late_success), threading.Thread(target=new_payment)]
    for t in threads:
        t.start()
    wait_for(lambda: waiting_on_locks(engine) >= 1, message="the new payment waiting on the request row")
    go_on.set()
    for t in threads:
        t.join(30)
    assert answers["webhook"].status_code == 200
    assert (answers["pay"].status_code, answers["pay"].json["error"]) == (409, "payment_in_flight")
    assert [(p["id"], p["state"]) for p in payments(engine, debtor.account)] == [(failed_id, "pending")]


def waiting_on_locks(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                        "AND datname = current_database()").scalar_one())


def test_a_success_stored_while_the_check_asked_stripe_keeps_the_payment_in_flight(client, engine, runtime, debtor,
                                                                                   stripe_fake, monkeypatch):
    """Stripe's listing answered "no intent", and meanwhile the intent's success webhook came in:
    the verdict must not fail a payment whose money arrived."""
    from app.payments import bad_debt_reconcile

    stripe_fake.intent_outcome = "server_error_after_charge"
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    payment_id, now = response.json["payment_id"], datetime.now(UTC)
    hidden = stripe_fake.intents.copy()
    stripe_fake.intents.clear()
    assert reconcile(runtime, payment_id, now + LATER).outcome == "not_found_once"
    [charged] = stripe_fake.charged_behind_errors
    real_find = bad_debt_reconcile._find

    def listing_then_webhook(*args: Any) -> Any:
        found = real_find(*args)  # nothing, yet
        stripe_fake.intents.update(hidden)
        assert post_event(client, intent_event("succeeded", debtor, charged["id"], payment_id)).status_code == 200
        return found

    monkeypatch.setattr(bad_debt_reconcile, "_find", listing_then_webhook)
    assert reconcile(runtime, payment_id, now + LATER + timedelta(minutes=5)).outcome == "already_done"
    assert payments(engine, debtor.account)[0]["state"] == "pending"
    assert recompute(engine, runtime, debtor.account)["status"] == "lifting"


def test_two_charged_payments_of_one_debt_are_flagged_as_paid_twice(client, engine, runtime, debtor, stripe_fake):
    """A payment failed as never created, a second one paid the debt, then the first one's charge
    turned up: both were charged for the same invoice."""
    from app.payments.bad_debt_settle import settle

    first, late = failed_with_a_hidden_charge(client, engine, runtime, debtor, stripe_fake)

    stripe_fake.intent_outcome = "succeeded"
    second = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert second.status_code == 202
    evt = intent_event("succeeded", debtor, second.json["stripe_payment_intent_id"], second.json["payment_id"])
    assert post_event(client, evt).status_code == 200
    assert settle(runtime, second.json["payment_id"]).settled_elsewhere == ()

    assert post_event(client, intent_event("succeeded", debtor, late["id"], first)).status_code == 200
    settled = settle(runtime, first)
    assert settled.settled_elsewhere == (debtor.invoice,)
    assert f"also paid by bad-debt payment {second.json['payment_id']}" in settled.details[0]


def waiting_behind_a_second(client: Any, engine: Engine, runtime: Any, debtor: Any, stripe_fake: Any
                            ) -> tuple[int, dict[str, Any]]:
    """A payment failed, whose charge turned up while a second payment was in flight (a bank debit:
    pending for days), so it could not be reopened: (its id, the second's answer)."""
    first, charged = failed_with_a_hidden_charge(client, engine, runtime, debtor, stripe_fake)
    stripe_fake.intent_outcome = "processing"
    second = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key()).json
    assert post_event(client, intent_event("succeeded", debtor, charged["id"], first)).status_code == 200
    states = {p["id"]: p["state"] for p in payments(engine, debtor.account)}
    assert (states[first], states[second["payment_id"]]) == ("failed", "pending")
    return first, second


def test_a_charged_payment_waiting_behind_another_takes_its_slot_when_that_one_fails(client, engine, runtime,
                                                                                     debtor, stripe_fake, settings):
    """The second payment is declined. The money of the first is in: the account must stay lifting,
    a third payment must be refused, and the first one's settlement is queued at once."""
    first, second = waiting_behind_a_second(client, engine, runtime, debtor, stripe_fake)
    take_queued_settlements(settings)  # the one its success queued, which found it failed

    declined = intent_event("failed", debtor, second["stripe_payment_intent_id"], second["payment_id"],
                            decline="insufficient_funds")
    assert post_event(client, declined).status_code == 200
    states = {p["id"]: p["state"] for p in payments(engine, debtor.account)}
    assert (states[first], states[second["payment_id"]]) == ("pending", "failed")
    assert recompute(engine, runtime, debtor.account)["status"] == "lifting"
    stripe_fake.intent_outcome = "succeeded"
    third = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert (third.status_code, third.json["error"]) == (409, "payment_in_flight")
    assert take_queued_settlements(settings) == [first]


def test_a_reconciliation_failing_the_payment_in_flight_queues_the_settlement_of_the_one_charged_behind_it(
        client, engine, runtime, debtor, stripe_fake, settings, celery_app):
    first, second = waiting_behind_a_second(client, engine, runtime, debtor, stripe_fake)
    take_queued_settlements(settings)
    stripe_fake.set_status(second["stripe_payment_intent_id"], "requires_payment_method", decline_code="do_not_honor")
    backdate(engine, second["payment_id"], LATER)

    result = celery_app.tasks[RECONCILE].apply([second["payment_id"]]).get()
    assert result["outcome"] == "failed"
    states = {p["id"]: p["state"] for p in payments(engine, debtor.account)}
    assert (states[first], states[second["payment_id"]]) == ("pending", "failed")
    assert take_queued_settlements(settings) == [first]


def test_a_refund_failing_the_payment_in_flight_queues_the_settlement_of_the_one_charged_behind_it(
        client, engine, runtime, debtor, stripe_fake, settings, celery_app):
    first, second = waiting_behind_a_second(client, engine, runtime, debtor, stripe_fake)
    intent = second["stripe_payment_intent_id"]
    stripe_fake.set_status(intent, "succeeded")
    assert post_event(client, intent_event("succeeded", debtor, intent, second["payment_id"])).status_code == 200
    refund(client, debtor, intent)  # an operator refunded the second one before it settled
    take_queued_settlements(settings)

    result = celery_app.tasks[SETTLE].apply([second["payment_id"]]).get()
    assert result["outcome"] == "refunded"
    assert take_queued_settlements(settings) == [first]


def test_a_declined_new_payment_queues_the_settlement_of_the_one_charged_while_it_was_asked(
        client, engine, runtime, debtor, stripe_fake, settings, monkeypatch):
    """The first payment's charge turns up while a new payment's request is asking Stripe (so the
    first cannot take the in-flight slot); the new one is declined: the first takes the slot, and
    its settlement is queued by the declined request."""
    first, charged = failed_with_a_hidden_charge(client, engine, runtime, debtor, stripe_fake)
    real_create = bad_debt._create_intent

    def success_arrives_meanwhile(*args: Any) -> Any:
        assert post_event(client, intent_event("succeeded", debtor, charged["id"], first)).status_code == 200
        take_queued_settlements(settings)  # its webhook's, which finds it failed still
        return real_create(*args)

    monkeypatch.setattr(bad_debt, "_create_intent", success_arrives_meanwhile)
    stripe_fake.intent_outcome = "decline"
    declined = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert declined.status_code == 402
    assert {p["id"]: p["state"] for p in payments(engine, debtor.account)}[first] == "pending"
    assert take_queued_settlements(settings) == [first]


def stuck_of(engine: Engine, task: str, account: str) -> list[str]:
    with engine.connect() as conn:
        return list(conn.exec_driver_sql("SELECT state FROM subs_stuck_events WHERE task_name = %(t)s "
                                         "AND account_id = %(a)s", {"t": task, "a": account}).scalars())


NO_KEY = "STRIPE_API_KEY is not set"


def test_without_a_stripe_key_a_charged_payment_waits_for_its_settlement_and_nothing_asks_stripe(
        client, engine, runtime, debtor, stripe_fake, celery_app, settings, monkeypatch, caplog):
    """make run's default has no STRIPE_API_KEY. The settlement asked Stripe to pay the invoices
    out of band with an empty key: at api.stripe.com a 401, filed as dead stuck work, which the
    settlement sweep then passes over even once a key is set (a Stripe that takes any key, the
    fake, was asked). Now the sweep and the task skip: nothing asked, nothing changed, settled once
    the key is set."""
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    payment_id = response.json["payment_id"]
    evt = intent_event("succeeded", debtor, response.json["stripe_payment_intent_id"], payment_id)
    assert post_event(client, evt).status_code == 200
    take_queued_settlements(settings)  # the webhook's
    with engine.begin() as conn:  # charged a while ago: the sweep's to settle
        conn.exec_driver_sql("UPDATE bad_debt_payment SET updated_at = updated_at - interval '5 minutes' "
                             "WHERE id = %(id)s", {"id": payment_id})
    with_key = runtime.settings
    monkeypatch.setattr(runtime, "settings", with_key.with_overrides(stripe_api_key=""))
    sweep, task = celery_app.tasks["tasks.settle_unsettled_bad_debt_payments"], celery_app.tasks[SETTLE]

    with caplog.at_level(logging.WARNING):
        assert sweep.apply().get() == {"found": 0, "sent": 0, "skipped": NO_KEY, "deferred": True}
        assert take_queued_settlements(settings) == []
        skipped = task.apply([payment_id]).get()
    assert (skipped["outcome"], skipped["detail"]) == ("not_sent", NO_KEY)
    assert any(NO_KEY in r.getMessage() and "settle" in r.getMessage() for r in caplog.records), caplog.text
    assert stripe_fake.invoice_payments() == []
    [row] = payments(engine, debtor.account)
    assert (row["state"], row["settle_sent"] or {}) == ("pending", {})
    assert stuck_of(engine, SETTLE, debtor.account) == []

    monkeypatch.setattr(runtime, "settings", with_key)  # the key is set: the sweep settles it
    assert sweep.apply().get() == {"found": 1, "sent": 1}
    assert take_queued_settlements(settings) == [payment_id]
    assert task.apply([payment_id]).get()["outcome"] == "settled"
    assert payments(engine, debtor.account)[0]["state"] == "succeeded"


def test_without_a_stripe_key_a_payment_whose_outcome_never_came_is_not_checked_and_nothing_asks_stripe(
        client, engine, runtime, debtor, stripe_fake, celery_app, settings, monkeypatch, caplog):
    """make run's default has no STRIPE_API_KEY. The reconciliation claimed the payment's check
    (moving its next one on) and asked Stripe with an empty key: at api.stripe.com a 401, a dead
    stuck row at every check, the account lifting all along (a Stripe that takes any key, the fake,
    was asked). Now the sweep claims nothing and the task asks nothing; checked once the key is set."""
    stripe_fake.intent_outcome = "processing"
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    payment_id = response.json["payment_id"]
    backdate(engine, payment_id, LATER)
    with_key = runtime.settings
    monkeypatch.setattr(runtime, "settings", with_key.with_overrides(stripe_api_key=""))
    sweep, task = celery_app.tasks["tasks.reconcile_bad_debt_payments"], celery_app.tasks[RECONCILE]
    calls = len(stripe_fake.calls)

    with caplog.at_level(logging.WARNING):
        assert sweep.apply().get() == {"due": 0, "sent": 0, "skipped": NO_KEY, "deferred": True}
        assert take_queued(settings, RECONCILE) == []
        skipped = task.apply([payment_id]).get()
    assert (skipped["outcome"], skipped["detail"]) == ("not_sent", NO_KEY)
    assert any(NO_KEY in r.getMessage() and "reconcil" in r.getMessage() for r in caplog.records), caplog.text
    assert len(stripe_fake.calls) == calls
    [row] = payments(engine, debtor.account)
    assert (row["state"], row["reconcile_checks"], row["reconcile_after"], row["not_found_since"],
            row["stripe_status"]) == ("pending", 0, None, None, None)
    assert stuck_of(engine, RECONCILE, debtor.account) == []

    monkeypatch.setattr(runtime, "settings", with_key)  # the key is set: checked at once
    assert sweep.apply().get() == {"due": 1, "sent": 1}
    assert [args for _id, args in take_queued(settings, RECONCILE)] == [[payment_id]]
    assert task.apply([payment_id]).get()["outcome"] == "processing"
