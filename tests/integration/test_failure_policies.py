"""Task failure policies by failure class (DESIGN section 8), on the real worker and broker:
rate limits honour Retry-After, permanent errors do not retry, every give-up is a visible
subs_stuck_events row, and beat re-drives what can be re-driven."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2
import pytest
from prometheus_client import REGISTRY
from sqlalchemy.exc import OperationalError

from app.db import Conflict, DatabaseUnavailable, ValueRejected
from app.payments.pay import lock_account_payments, retry_charging, retry_payment
from app.payments.retries import claim_due
from app.payments.stripe_client import make_stripe_client
from tasks.failures import (
    MAX_COUNTDOWN,
    POLICIES,
    RETRY_AFTER_SPREAD,
    FailureKind,
    TaskFailure,
    classify,
    record_stuck,
    retry_after_seconds,
)
from tests.conftest import post_event, service_headers, wait_for
from tests.fakes import fake_stripe as outcomes
from tests.integration.dunning_setup import failed_invoice, retries
from tests.stripe_events import event, unique

pytestmark = pytest.mark.worker


def stuck(engine, **where: str) -> list[dict]:
    sql = "SELECT * FROM subs_stuck_events" + (" WHERE " + " AND ".join(f"{k} = %({k})s" for k in where)
                                               if where else "") + " ORDER BY id"
    with engine.connect() as conn:
        return [dict(r) for r in conn.exec_driver_sql(sql, where).mappings()]


def test_every_countdown_stays_far_below_the_visibility_timeout(settings):
    for kind, policy in POLICIES.items():
        for attempt in range(policy.max_retries + 1):
            assert policy.countdown(attempt) <= MAX_COUNTDOWN, kind
        assert policy.countdown(0, hint=3600) <= MAX_COUNTDOWN  # even a huge Retry-After is capped
    assert settings.visibility_timeout >= MAX_COUNTDOWN * 4
    assert not POLICIES[FailureKind.INVALID_DATA].retry and not POLICIES[FailureKind.PERMANENT_API_ERROR].retry


def test_retry_after_wins_and_is_spread():
    """A Retry-After is honoured (never sooner, whatever the attempt's own backoff would be), and the
    tasks one rate limit refused together are spread over the next fifth of it, not all sent again
    in the same second."""
    policy = POLICIES[FailureKind.RATE_LIMITED]
    countdowns = [policy.countdown(5, hint=7) for _ in range(50)]
    assert all(7 <= c <= 7 * RETRY_AFTER_SPREAD for c in countdowns)
    assert len(set(countdowns)) > 1
    assert all(1 <= policy.countdown(0, hint=0) <= RETRY_AFTER_SPREAD for _ in range(20))  # "0" is not "now"


@pytest.mark.parametrize(("headers", "seconds"), [
    ({"Retry-After": "7"}, 7.0), ({"retry-after": "1.5"}, 1.5),  # the header's name in any case
    ({"Retry-After": "nan"}, None), ({"Retry-After": "inf"}, None),  # a NaN countdown could not be published
    ({"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}, None), ({"Retry-After": "soon"}, None), ({}, None), (None, None),
])
def test_retry_after_is_a_finite_number_of_seconds_or_nothing(headers, seconds):
    assert retry_after_seconds(headers) == seconds


def test_failures_are_classified_by_what_failed():
    refused = psycopg2.OperationalError("could not connect to server: Connection refused")
    down = OperationalError("SELECT 1", {}, refused)
    assert classify(down) == FailureKind.DATABASE_UNAVAILABLE
    assert classify(TaskFailure(FailureKind.RATE_LIMITED, "429", retry_after=2)) == FailureKind.RATE_LIMITED
    assert classify(ValueError("bad payload")) == FailureKind.INVALID_DATA
    assert classify(ConnectionRefusedError()) == FailureKind.BROKER_UNAVAILABLE
    # What the hot paths raise from the driver's own cursor: an outage is an outage there too.
    assert classify(DatabaseUnavailable("database connection lost")) == FailureKind.DATABASE_UNAVAILABLE
    assert classify(psycopg2.OperationalError("server closed the connection unexpectedly")) == \
        FailureKind.DATABASE_UNAVAILABLE
    assert classify(psycopg2.InterfaceError("connection already closed")) == FailureKind.DATABASE_UNAVAILABLE
    assert classify(Conflict("deadlock detected")) == FailureKind.LOCK_CONTENTION
    assert classify(ValueRejected("integer out of range")) == FailureKind.INVALID_DATA


def test_a_passing_failure_that_outlasts_its_retries_is_left_for_beat_not_dead(celery_app, accounts, engine):
    """A database outage longer than the task's own backoff: beat re-drives the work once it is over.
    Only what waiting will not heal (invalid data) is dead, for an operator."""
    from app.dispatch import BrokerUnavailable
    from tasks.recompute import handle_failure

    account, _ = accounts.create()
    task = celery_app.tasks["tasks.recompute_account"]
    for exc, expected in ((DatabaseUnavailable("database connection lost"), "retrying"),
                          (BrokerUnavailable("broker did not accept tasks.sweep_batch: ConnectionError"), "retrying"),
                          (ValueRejected("integer out of range"), "dead"),
                          (AttributeError("a bug"), "dead")):  # unexpected: retried, then for an operator
        task.push_request(retries=POLICIES[classify(exc)].max_retries, id=f"t-{expected}")
        try:
            with pytest.raises(type(exc)):
                handle_failure(task, exc, account, {"account_id": account, "trigger": "MANUAL", "cause": None})
        finally:
            task.pop_request()
        (row,) = stuck(engine, account_id=account, error_class=classify(exc).value)
        assert row["state"] == expected
        assert (row["next_redrive_at"] is not None) == (expected == "retrying")


def requests_of(engine, account: str) -> int:
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT count(*) FROM recompute_request WHERE account_id = %(a)s",
                                    {"a": account}).scalar_one()


def test_a_recompute_given_up_as_dead_is_not_sent_again_every_minute_and_nothing_is_lost(client, accounts, engine,
                                                                                        celery_app):
    """Bad data: the recompute rolls back and gives up as dead, for an operator. The webhook's request
    it failed on stays, but the stale-request re-drive passes over it (not every minute, failing the
    same way), nor is its due review requested again every tick; a later webhook touches the request
    and gets one more recompute from the re-drive (and no loop if that one dies too), and an
    operator's re-drive still recomputes."""
    import tasks.recompute  # registers the task
    import tasks.stuck  # noqa: F401  (resolves a re-driven row when its task succeeds)
    from app.redrive import redrive
    from app.stuck_work import task_id_for

    account, customer = accounts.create()
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO subs_dunning (account_id, status, level, next_review_at) "
                             "VALUES (%(a)s, 'past_due', 'bogus', now() - interval '1 hour')", {"a": account})
        conn.exec_driver_sql("INSERT INTO recompute_request (account_id, trigger, cause, requested_at) "
                             "VALUES (%(a)s, 'PAYMENT_FAILED', 'evt_1', now() - interval '2 minutes')", {"a": account})
    task = celery_app.tasks["tasks.recompute_account"]
    result = task.apply(args=[account, "PAYMENT_FAILED", "evt_1"], kwargs={"coalesced": True})
    assert isinstance(result.result, ValueError), result.result
    (dead,) = stuck(engine, account_id=account)
    assert dead["state"] == "dead" and dead["task_args"] == {"account_id": account, "trigger": "PAYMENT_FAILED",
                                                             "cause": "evt_1"}
    assert requests_of(engine, account) == 1  # kept: nothing accepted is dropped
    try:
        for _ in range(2):  # neither the request nor the review, again and again
            report = redrive(engine, celery_app, stale_after_seconds=0)
            assert (report["sent"], report["reviewed"]) == (0, 0), report
        # a later webhook for the account touches the pending request: the re-drive sends it once more
        answer = post_event(client, event("invoice.payment_failed", id=unique("in"), customer=customer))
        assert answer.status_code == 200 and answer.json["state"] == "accepted", answer.json
        assert redrive(engine, celery_app, stale_after_seconds=0)["sent"] == 1
        again = task.apply(args=[account, "PAYMENT_FAILED", "evt_1"], kwargs={"coalesced": True})
        assert isinstance(again.result, ValueError), again.result  # the data is still bad: dead again ...
        assert redrive(engine, celery_app, stale_after_seconds=0)["sent"] == 0  # ... and not sent every minute
        # a review that comes due after the failure is requested again: it touches the request, sent again
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE subs_dunning SET next_review_at = now() + interval '1 second' "
                                 "WHERE account_id = %(a)s", {"a": account})
        report = redrive(engine, celery_app, stale_after_seconds=0, now=datetime.now(UTC) + timedelta(seconds=2))
        assert (report["reviewed"], report["sent"]) == (1, 1), report
    finally:
        celery_app.control.purge()
    # the operator fixes the data and re-drives the dead row: it recomputes (the pending request too)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE subs_dunning SET level = 'none' WHERE account_id = %(a)s", {"a": account})
    redriven = task.apply(kwargs=dead["task_args"], task_id=task_id_for(dead["id"]))
    assert redriven.get()["outcome"] == "changed"
    assert stuck(engine, id=str(dead["id"]))[0]["state"] == "resolved"
    assert requests_of(engine, account) == 0


class DyingRecompute:
    """A recompute that fails on what it read (invalid data: dead at once), held inside its
    transaction (its lock, and its delete of the request it took) until ``go`` is set."""

    def __init__(self, celery_app, monkeypatch, account: str, coalesced: bool) -> None:
        import app.recompute.service as service

        self.inside, self.go = threading.Event(), threading.Event()
        self.out: dict[str, Any] = {}
        self.real_compute = service.compute

        def dying_compute(*args, **kwargs):
            self.inside.set()
            assert self.go.wait(20)
            raise ValueError("'bogus' is not a valid Level")

        monkeypatch.setattr(service, "compute", dying_compute)
        self.monkeypatch = monkeypatch
        task = celery_app.tasks["tasks.recompute_account"]
        trigger, cause = ("PAYMENT_FAILED", "evt_1") if coalesced else ("NINJAPANEL_BUTTON", "support")
        self.thread = threading.Thread(target=lambda: self.out.update(
            result=task.apply(args=[account, trigger, cause], kwargs={"coalesced": coalesced})))
        self.thread.start()
        assert self.inside.wait(20), "the recompute to be running"

    def die(self) -> None:
        self.go.set()
        self.thread.join(20)
        assert isinstance(self.out["result"].result, ValueError), self.out["result"].result
        import app.recompute.service as service

        self.monkeypatch.setattr(service, "compute", self.real_compute)


def the_webhooks_request_outlives_the_dead_run(engine, celery_app, account: str) -> None:
    """The run is recorded dead and the webhook's request is still there: the stale-request re-drive
    would send it (were the webhook's message lost), and the recompute it gets computes."""
    from app.redrive import redrive

    (dead,) = stuck(engine, account_id=account)
    assert dead["state"] == "dead"
    assert requests_of(engine, account) == 1
    try:
        assert redrive(engine, celery_app, stale_after_seconds=0)["sent"] == 1
    finally:
        celery_app.control.purge()
    queued = celery_app.tasks["tasks.recompute_account"].apply(args=[account, "PAYMENT_FAILED", "evt_W"],
                                                                kwargs={"coalesced": True})
    assert queued.get()["outcome"] == "changed"
    assert requests_of(engine, account) == 0


def test_a_request_created_while_a_recompute_dies_is_recomputed(client, accounts, engine, celery_app, monkeypatch):
    """A run that took no request (the support button) dies while a webhook stores its event, creates
    the account's request and queues its recompute: that recompute finds the request and computes."""
    import tasks.recompute  # noqa: F401  (registers the task)

    account, customer = accounts.create()
    dying = DyingRecompute(celery_app, monkeypatch, account, coalesced=False)
    try:
        answer = post_event(client, event("invoice.payment_failed", id=unique("in"), customer=customer))
        assert answer.status_code == 200 and answer.json["enqueued"] is True, answer.json
    finally:
        dying.die()
    the_webhooks_request_outlives_the_dead_run(engine, celery_app, account)


def test_a_request_touched_while_a_recompute_dies_on_it_is_sent_again(flask_app, client, accounts, engine,
                                                                       celery_app, monkeypatch):
    """A run took the account's request (a webhook's) and dies. Meanwhile a second webhook's upsert
    waits for that request's row, finds it again once the run rolls back (not created: it queues
    nothing), and commits before the run is recorded dead. The request is still there and the
    stale-request re-drive sends it: the second webhook's event is recomputed."""
    import tasks.recompute as tr

    account, customer = accounts.create()
    first = post_event(client, event("invoice.payment_failed", id=unique("in"), customer=customer))
    assert first.json["enqueued"] is True
    celery_app.control.purge()  # its recompute is the dying one below
    answers: dict = {}
    second = threading.Thread(target=lambda: answers.update(w=post_event(
        flask_app.test_client(), event("invoice.payment_failed", id=unique("in"), customer=customer))))
    real_record_stuck = tr.record_stuck

    def record_after_the_webhook(*args, **kwargs):  # the webhook commits first
        second.join(20)
        return real_record_stuck(*args, **kwargs)

    monkeypatch.setattr(tr, "record_stuck", record_after_the_webhook)
    dying = DyingRecompute(celery_app, monkeypatch, account, coalesced=True)
    try:
        second.start()
        wait_for(lambda: count_waiting_ingest(engine) == 1, message="the webhook's upsert to wait for the request")
    finally:
        dying.die()
    assert not second.is_alive()
    assert answers["w"].status_code == 200 and answers["w"].json["state"] == "accepted", answers["w"].json
    assert answers["w"].json["enqueued"] is False  # it found the request pending: it relies on it
    the_webhooks_request_outlives_the_dead_run(engine, celery_app, account)


def count_waiting_ingest(engine) -> int:
    with engine.connect() as conn:
        return conn.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE '%%EXECUTE dunning_ingest%%'").scalar_one()


def test_a_rate_limited_retry_waits_for_retry_after_and_is_charged_once(client, accounts, engine, worker,
                                                                        celery_app, fake_stripe):
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    fake_stripe.script(outcomes.rate_limit(retry_after=1), outcomes.rate_limit(retry_after=1))
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    result = celery_app.send_task("tasks.retry_payment", [retry_id])
    assert result.get(timeout=30)["outcome"] == "sent"
    requests = fake_stripe.pay_requests(invoice)
    assert len(requests) == 3 and len({r.idempotency_key for r in requests}) == 1  # same attempt, same key
    assert len(fake_stripe.charges) == 1  # rate-limited requests never ran
    # The second failure in a row became visible while retrying; success resolved it.
    (row,) = stuck(engine, task_name="tasks.retry_payment")
    assert row["state"] == "resolved" and row["error_class"] == "rate_limited" and row["attempts"] == 2


def test_a_rate_limit_after_an_unanswered_charge_keeps_the_retry_counted_as_charging(client, accounts, engine,
                                                                                     worker, runtime, fake_stripe):
    """The first try ran at Stripe but its answer was lost; the task's retry with the same key is
    rate limited. The invoice may be collected already: the row must stay charging (the bad-debt
    payment sees it in flight), and a later delivery that finds it no longer due counts it (sent)."""
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    fake_stripe.script(outcomes.lost_answer(), outcomes.rate_limit())
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    stripe_client = make_stripe_client(runtime.settings)
    for kind in (FailureKind.REMOTE_UNAVAILABLE, FailureKind.RATE_LIMITED):  # the delivery, then its retry
        with pytest.raises(TaskFailure) as failed:
            retry_payment(engine, stripe_client, retry_id, datetime.now(UTC))
        assert failed.value.kind == kind
    assert fake_stripe.charges == [(invoice, retries(engine, account)[0]["idempotency_key"])]
    assert [r["state"] for r in retries(engine, account)] == ["charging"]
    with engine.begin() as conn:
        lock_account_payments(conn, account)
        assert retry_charging(conn, account, datetime.now(UTC), timedelta(minutes=30))

    later = retry_payment(engine, stripe_client, retry_id, datetime.now(UTC) + timedelta(minutes=31))
    assert later.outcome == "skipped" and "guard window" in (later.detail or "")
    assert [r["state"] for r in retries(engine, account)] == ["sent"]  # may have charged: stays counted
    assert len(fake_stripe.pay_requests(invoice)) == 2


def test_two_stuck_retries_of_one_account_keep_a_stuck_row_each(client, accounts, engine, celery_app, worker,
                                                                  fake_stripe):
    """Two retries of one account give up while Stripe does not answer: each keeps its own row (and
    its own task arguments, so beat re-drives both), and one's success resolves only its own."""
    account, customer = accounts.create()
    failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    (first,) = claim_due(engine, datetime.now(UTC))
    with engine.begin() as conn:  # another retry of the account (how it came is beside the point here)
        second = conn.exec_driver_sql(
            "INSERT INTO payment_retry (account_id, invoice_id, payment_method_id, retry_number, free, "
            "idempotency_key, scheduled_for, state, created_at, updated_at, attempts_seen_until) "
            "SELECT account_id, invoice_id, payment_method_id, retry_number, free, idempotency_key || ':2', "
            "scheduled_for, state, created_at, updated_at, attempts_seen_until "
            "FROM payment_retry WHERE id = %(id)s RETURNING id",
            {"id": first}).scalar_one()
    task = celery_app.tasks["tasks.retry_payment"]
    give_up = POLICIES[FailureKind.REMOTE_UNAVAILABLE].max_retries
    fake_stripe.script(outcomes.lost_answer(), outcomes.lost_answer())
    for retry_id in (first, second):
        assert task.apply(args=[retry_id], retries=give_up).failed()
    rows = stuck(engine, account_id=account)
    assert sorted((r["task_args"]["retry_id"], r["state"]) for r in rows) == [(first, "retrying"),
                                                                               (second, "retrying")]

    # The first one's re-drive: Stripe replays the charge its lost answer was for.
    assert task.apply(args=[first], retries=1).get()["outcome"] == "sent"
    states = {r["task_args"]["retry_id"]: r["state"] for r in stuck(engine, account_id=account)}
    assert states == {first: "resolved", second: "retrying"}


def test_a_permanent_api_error_does_not_retry_and_is_dead_stuck_work(client, accounts, engine, worker, celery_app,
                                                                     fake_stripe):
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    fake_stripe.script(outcomes.invalid())
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    celery_app.send_task("tasks.retry_payment", [retry_id])
    (row,) = wait_for(lambda: stuck(engine, account_id=account), message="stuck row")
    assert row["state"] == "dead" and row["error_class"] == "permanent_api_error" and row["attempts"] == 1
    assert row["task_args"] == {"retry_id": retry_id} and "InvalidRequestError" in row["error"]
    assert row["next_redrive_at"] is None  # dead work waits for an operator
    assert [r["state"] for r in retries(engine, account)] == ["refused"]  # nothing charged: no budget spent
    assert len(fake_stripe.pay_requests(invoice)) == 1

    listed = client.get("/ops/stuck-events?state=dead", headers=service_headers())
    assert listed.status_code == 200
    assert [e["id"] for e in listed.json["stuck_events"]] == [row["id"]] and listed.json["counts"]["dead"] == 1
    assert REGISTRY.get_sample_value("dunning_stuck_events", {"state": "dead"}) == 1
    assert client.get("/ops/stuck-events?state=lost", headers=service_headers()).status_code == 400
    assert client.get("/ops/stuck-events").status_code == 401


def test_a_stripe_5xx_is_indeterminate_and_left_to_the_webhook(client, accounts, engine, worker, celery_app,
                                                                fake_stripe):
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    fake_stripe.script(outcomes.server_error())
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    assert celery_app.send_task("tasks.retry_payment", [retry_id]).get(timeout=20)["outcome"] == "indeterminate"
    (row,) = retries(engine, account)
    assert row["state"] == "sent" and "indeterminate" in row["error"]
    assert len(fake_stripe.pay_requests(invoice)) == 1


def test_beat_redrives_retrying_work_and_an_operator_redrives_dead_work(client, accounts, engine, worker, celery_app,
                                                                        fake_stripe):
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    # The task gave up while Stripe did not answer; its row waits for its re-drive time.
    record_stuck(engine, "tasks.retry_payment", {"retry_id": retry_id}, account, FailureKind.REMOTE_UNAVAILABLE,
                 "TaskFailure: Stripe did not answer", 9, "retrying")
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE subs_stuck_events SET next_redrive_at = %(t)s",
                             {"t": datetime.now(UTC) - timedelta(seconds=1)})
    celery_app.send_task("tasks.redrive_stuck")
    (row,) = wait_for(lambda: stuck(engine, state="resolved"), message="re-driven and resolved")
    assert row["resolved_at"] is not None
    assert [r["state"] for r in retries(engine, account)] == ["sent"]
    assert len(fake_stripe.pay_requests(invoice)) == 1

    # Dead work (e.g. invalid data an operator has since fixed) is re-driven by hand.
    record_stuck(engine, "tasks.recompute_account", {"account_id": account, "trigger": "MANUAL", "cause": "ops"},
                 account, FailureKind.INVALID_DATA, "AccountNotFound", 1, "dead")
    (dead,) = stuck(engine, state="dead")
    response = client.post(f"/ops/stuck-events/{dead['id']}/redrive", headers=service_headers())
    assert response.status_code == 202 and response.json["task_id"].startswith(f"redrive-stuck-{dead['id']}-")
    wait_for(lambda: stuck(engine, id=str(dead["id"]))[0]["state"] == "resolved", message="dead work re-driven")
    assert client.post("/ops/stuck-events/999999/redrive", headers=service_headers()).status_code == 404


def test_an_operators_redrive_is_audited_with_the_authenticated_principal(client, accounts, engine, clean):
    # A re-drive by hand (a dead row too: work that was given up on runs again) named no one: the
    # audit log, which records the rollout changes and outbox skips with their actor, had no row.
    account, _ = accounts.create()
    record_stuck(engine, "tasks.recompute_account", {"account_id": account, "trigger": "MANUAL", "cause": "ops"},
                 account, FailureKind.INVALID_DATA, "AccountNotFound", 1, "dead")
    (dead,) = stuck(engine, state="dead")
    response = client.post(f"/ops/stuck-events/{dead['id']}/redrive", headers=service_headers())
    assert response.status_code == 202
    assert client.post("/ops/stuck-events/999999/redrive", headers=service_headers()).status_code == 404
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.exec_driver_sql(
            "SELECT actor, action, account_id, detail FROM audit_log ORDER BY id").mappings()]
    assert rows == [{"actor": "service", "action": "stuck.redrive", "account_id": account,
                     "detail": {"stuck_id": dead["id"], "task_name": "tasks.recompute_account",
                                "state_before": "dead", "task_id": response.json["task_id"]}}]


def test_an_attempt_still_running_at_stripe_is_retried_with_the_same_key(client, accounts, engine, worker,
                                                                       celery_app, fake_stripe):
    """A redelivered retry can reach Stripe while the killed worker's request with the same key is
    still running: Stripe answers 409 idempotency_error. That is not a failure of the attempt."""
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    fake_stripe.script(outcomes.in_progress())
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    assert celery_app.send_task("tasks.retry_payment", [retry_id]).get(timeout=30)["outcome"] == "sent"
    requests = fake_stripe.pay_requests(invoice)
    assert len(requests) == 2 and len({r.idempotency_key for r in requests}) == 1
    assert len(fake_stripe.charges) == 1
    assert [r["state"] for r in retries(engine, account)] == ["sent"]


def test_a_retry_refused_for_our_api_key_is_dead_under_credentials_refused(client, accounts, engine, celery_app,
                                                                          worker, fake_stripe):
    """Stripe refuses a payment retry for our API key (401: rolled or revoked), as it refuses the
    bad-debt settlement's, which b9739b8 files as credentials_refused (the class README asks
    operators to watch). The retry's refusal was filed as permanent_api_error: a revoked key, which
    shows first on retries (far more of them than bad-debt payments), raised no such alert. The retry
    row is refused and the account waits the refused backoff, as before; its stuck row stays dead for
    an operator (a re-drive of a refused retry charges nothing), under the key's class."""
    account, customer = accounts.create()
    failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    labels = {"task": "tasks.retry_payment", "failure_class": "credentials_refused", "action": "dead"}
    before = REGISTRY.get_sample_value("dunning_task_failures_total", labels) or 0.0
    fake_stripe.script(outcomes.key_refused())

    assert celery_app.tasks["tasks.retry_payment"].apply(args=[retry_id]).failed()

    (row,) = stuck(engine, account_id=account)
    assert (row["state"], row["error_class"]) == ("dead", "credentials_refused"), row
    assert "AuthenticationError" in row["error"]
    assert [r["state"] for r in retries(engine, account)] == ["refused"]
    assert REGISTRY.get_sample_value("dunning_task_failures_total", labels) == before + 1
