"""The web app at its edges: a broker it cannot address, a result store that is down, a row lock
held past lock_timeout. Each answer is the documented one (a 200 that says the recompute was not
queued, a 503 with Retry-After), never a 500 that says nothing was accepted when something was."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from sqlalchemy import Engine

from app.config import Settings
from app.runtime import Runtime
from tasks.failures import FailureKind, record_stuck
from tests.conftest import SUPPORT_TOKEN, Accounts, post_event, service_headers
from tests.stripe_events import event

SUPPORT = {"Authorization": f"Bearer {SUPPORT_TOKEN}"}
# Settings refuses this one at start; the app is built around Settings here (with_overrides), as
# with any broker URL redis-py cannot read for a reason Settings does not check.
UNREADABLE_BROKER = "redis://127.0.0.1:abc/0"


def app_with_broker(settings: Settings, runtime: Runtime, broker_url: str) -> Flask:
    from app import create_app
    from tasks.factory import make_celery

    return create_app(settings, runtime=runtime, celery=make_celery(settings.with_overrides(broker_url=broker_url)))


def stored_state(engine: Engine, event_id: str) -> Any:
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT state FROM stripe_event WHERE id = %(i)s", {"i": event_id}).scalar()


def test_a_webhook_whose_recompute_cannot_reach_an_unreadable_broker_is_stored_and_left_for_beat(
        settings, runtime, engine, accounts: Accounts):
    """The lane for the broker was built outside send_many's try: redis-py's ValueError became a 500
    "nothing was accepted" for an event that was committed. Now it is a broker that did not take the
    message: 200, enqueue_failed, and beat re-drives the request."""
    app = app_with_broker(settings, runtime, UNREADABLE_BROKER)
    _account, customer = accounts.create()
    evt = event("invoice.payment_failed", customer=customer)
    response = post_event(app.test_client(), evt)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json["state"] == "enqueue_failed" and not response.json["enqueued"]
    assert stored_state(engine, evt["id"]) == "enqueue_failed"


def test_the_support_button_with_an_unreadable_broker_is_a_503_and_its_audit_says_not_queued(
        settings, runtime, accounts: Accounts):
    app = app_with_broker(settings, runtime, UNREADABLE_BROKER)
    account, _customer = accounts.create()
    response = app.test_client().post(f"/support/accounts/{account}/recompute", headers=SUPPORT)
    assert response.status_code == 503, (response.status_code, response.get_data(as_text=True))
    assert response.json is not None
    assert response.headers["Retry-After"] and "nothing was queued" in response.json["reason"]


def test_an_operators_redrive_with_an_unreadable_broker_is_a_503_and_its_audit_says_not_queued(
        settings, runtime, engine, accounts: Accounts):
    # The row is set retrying (beat sends it later, under another task id): the audit row must not
    # name a task that never went, as the support button's says.
    app = app_with_broker(settings, runtime, UNREADABLE_BROKER)
    account, _customer = accounts.create()
    record_stuck(engine, "tasks.recompute_account", {"account_id": account, "trigger": "MANUAL", "cause": "ops"},
                 account, FailureKind.INVALID_DATA, "AccountNotFound", 1, "dead")
    with engine.connect() as conn:
        stuck_id = conn.exec_driver_sql("SELECT id FROM subs_stuck_events").scalar_one()
    response = app.test_client().post(f"/ops/stuck-events/{stuck_id}/redrive", headers=service_headers())
    assert response.status_code == 503, (response.status_code, response.get_data(as_text=True))
    with engine.connect() as conn:
        (detail,) = conn.exec_driver_sql("SELECT detail FROM audit_log WHERE action = 'stuck.redrive'").scalars()
        state = conn.exec_driver_sql("SELECT state FROM subs_stuck_events").scalar_one()
    assert detail["queued"] is False and detail["state_before"] == "dead" and state == "retrying"


def test_the_support_button_whose_result_store_cannot_watch_the_task_says_it_was_queued(
        settings, runtime, accounts: Accounts):
    """The task went on the queue, then the result store failed to watch it (a backend redis-py
    cannot address, one Settings does not check when built directly): the answer is the queued
    task's, not a 500 saying nothing was queued."""
    from app import create_app
    from tasks.factory import make_celery

    unreadable = settings.with_overrides(result_backend="redis://127.0.0.1:abc/1")
    app = create_app(settings, runtime=runtime, celery=make_celery(unreadable))
    account, _customer = accounts.create()
    response = app.test_client().post(f"/support/accounts/{account}/recompute", headers=SUPPORT)
    assert response.status_code == 202, (response.status_code, response.get_data(as_text=True))
    assert response.json is not None
    assert response.json["task_id"]


def test_a_support_task_polled_while_the_result_store_is_down_is_a_503_with_retry_after(
        settings, runtime, engine, accounts: Accounts):
    """The button answers 503 when Redis is down; the status the page polls right after it let
    redis-py's ConnectionError through to the 500 handler."""
    import uuid

    from app.db import unit_of_work
    from app.support import audit

    account, _customer = accounts.create()
    task_id = str(uuid.uuid4())
    with unit_of_work(engine) as conn:  # a task support started
        audit.record(conn, "alice", "recompute", account, {"task_id": task_id})
    app = app_with_broker(settings, runtime, "redis://127.0.0.1:1/0")  # the result backend is the broker's Redis
    response = app.test_client().get(f"/support/tasks/{task_id}", headers=SUPPORT)
    assert response.status_code == 503, (response.status_code, response.get_data(as_text=True))
    assert response.json is not None
    assert response.headers["Retry-After"] and response.json["reason"] == (
        "the task result store is unreachable; retry later")


def test_a_webhook_held_up_by_a_row_lock_past_lock_timeout_is_a_503_with_retry_after(
        client, engine, accounts: Accounts):
    """A recompute transaction holds the account's recompute_request row; the webhook's upsert of it
    waits past lock_timeout (5 s). psycopg2's LockNotAvailable escaped the cursor's error mapping
    raw: a 500 "unexpected error" for every request of the batch, where a deadlock is a 503."""
    account, customer = accounts.create()
    assert post_event(client, event("invoice.payment_failed", customer=customer)).status_code == 200
    holder = engine.connect()
    try:
        assert holder.exec_driver_sql("SELECT 1 FROM recompute_request WHERE account_id = %(a)s FOR UPDATE",
                                      {"a": account}).all()
        second = event("invoice.payment_failed", customer=customer)
        response = post_event(client, second)
    finally:
        holder.rollback()
        holder.close()
    assert response.status_code == 503, (response.status_code, response.get_data(as_text=True))
    assert response.headers["Retry-After"] == "5" and "retry later" in response.json["reason"]
    assert stored_state(engine, second["id"]) is None  # not accepted: Stripe redelivers it
    assert post_event(client, second).status_code == 200  # as it does once the lock is gone


def test_a_batch_that_waited_past_lock_timeout_holds_back_only_the_blocked_accounts_events(
        settings, client, celery_app, engine, accounts: Accounts, monkeypatch):
    """A group commit waited past lock_timeout on one account's row (a long recompute of it holds
    it): nothing of the batch was stored. It is not run again whole (the holder is likely still
    busy: every request queued behind it would wait as long again); each event is stored on its
    own, waiting only briefly for a lock, so that only the blocked account's request answers 503
    (Stripe redelivers it) and the other account's event is stored and its recompute queued."""
    import json

    from sqlalchemy import event as sa_event

    from app.db import LOCK_TIMEOUT, TimedOut, make_engine
    from webhooks import store
    from webhooks.ingest import Ingested, Ingestor
    from webhooks.mirror import extract

    quick = make_engine(settings.database_url, pool_size=1, max_overflow=0)

    @sa_event.listens_for(quick, "connect")
    def _short_lock_wait(dbapi_conn: Any, _record: Any) -> None:  # after the app's own 5 s
        with dbapi_conn.cursor() as cur:
            cur.execute("SET lock_timeout = '200ms'")
        dbapi_conn.commit()

    account, customer = accounts.create()
    _other, other_customer = accounts.create()
    assert post_event(client, event("invoice.payment_failed", customer=customer)).status_code == 200  # its request row
    runs: list[int] = []
    ingest_events = store.ingest_events

    def counted(conn: Any, items: Any) -> Any:
        runs.append(len(items))
        return ingest_events(conn, items)

    monkeypatch.setattr(store, "ingest_events", counted)
    events = [event("invoice.payment_failed", customer=c) for c in (customer, other_customer)]
    ingestor = Ingestor(quick, celery_app)
    holder = engine.connect()
    try:
        holder.exec_driver_sql("SELECT 1 FROM recompute_request WHERE account_id = %(a)s FOR UPDATE", {"a": account})
        blocked, other = ingestor._flush([(extract(e), json.dumps(e)) for e in events])
        assert ingestor.connection is not None
        waits = ingestor.connection.exec_driver_sql("SHOW lock_timeout").scalar()
    finally:
        holder.rollback()
        holder.close()
        ingestor.close()
        quick.dispose()
    assert runs == [2, 1, 1]  # the batch once, then each event alone
    assert isinstance(blocked, TimedOut)
    assert isinstance(other, Ingested) and (other.state, other.enqueued) == ("accepted", True)
    assert [stored_state(engine, e["id"]) for e in events] == [None, "accepted"]
    assert waits == LOCK_TIMEOUT  # the brief waits were for those statements only


@pytest.mark.parametrize(("limit", "statement"), [
    ("SET LOCAL lock_timeout = '100ms'", "SELECT pg_advisory_xact_lock(%(key)s)"),  # 55P03
    ("SET LOCAL statement_timeout = '100ms'", "SELECT pg_advisory_xact_lock(%(key)s)"),  # 57014
])
def test_a_statement_sqlalchemy_ran_that_timed_out_is_a_503_with_retry_after(engine: Engine, limit, statement):
    """The DBAPIError handler behind every endpoint: SQLAlchemy's wrapping of a lock or statement
    timeout was a 500 "database error; nothing was accepted"."""
    from app import errors
    from app.db import unit_of_work

    key = 4_242_424_242  # an advisory lock no other test takes
    app = Flask(__name__)
    errors.register(app)

    @app.post("/store")
    def store() -> str:
        with unit_of_work(engine) as conn:
            conn.exec_driver_sql(limit)
            conn.exec_driver_sql(statement, {"key": key})
        return "stored"

    with engine.connect() as holder:
        holder.exec_driver_sql("SELECT pg_advisory_lock(%(key)s)", {"key": key})
        try:
            response = app.test_client().post("/store")
        finally:
            holder.exec_driver_sql("SELECT pg_advisory_unlock(%(key)s)", {"key": key})
            holder.commit()
    assert response.status_code == 503, (response.status_code, response.get_data(as_text=True))
    assert response.json is not None
    assert response.headers["Retry-After"] == "5" and "SELECT" not in response.json["reason"]


def test_a_statement_sqlalchemy_ran_that_lost_a_race_is_a_503_with_retry_after(engine: Engine):
    """A serialization failure (SQLSTATE 40001; a deadlock is 40P01, of the same class) through
    SQLAlchemy was a 500 "database error", where the same on the DBAPI cursor (Conflict) is a 503:
    the transaction was rolled back whole and the same request again normally goes through."""
    from app import errors
    from app.db import unit_of_work

    app = Flask(__name__)
    errors.register(app)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE edge_race (id int PRIMARY KEY, n int); INSERT INTO edge_race VALUES (1, 0)")
    try:
        @app.post("/store")
        def store() -> str:
            with unit_of_work(engine) as conn:
                conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                conn.exec_driver_sql("SELECT n FROM edge_race WHERE id = 1")  # the snapshot is taken here
                with engine.begin() as other:  # a concurrent write commits after that snapshot
                    other.exec_driver_sql("UPDATE edge_race SET n = n + 1 WHERE id = 1")
                conn.exec_driver_sql("UPDATE edge_race SET n = n + 10 WHERE id = 1")  # 40001
            return "stored"

        response = app.test_client().post("/store")
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE edge_race")
    assert response.status_code == 503, (response.status_code, response.get_data(as_text=True))
    assert response.json is not None
    assert response.headers["Retry-After"] == "1" and "UPDATE" not in response.json["reason"]


def test_a_webhook_signed_with_a_secret_set_with_a_trailing_newline_verifies(
        settings, runtime, client, accounts: Accounts, monkeypatch):
    """STRIPE_WEBHOOK_SECRET from a mounted file (`kubectl create secret --from-file`) ends in a
    newline: every genuine webhook was a 400 "signature does not match the body"."""
    from tests.conftest import WEBHOOK_SECRET

    loaded = Settings.from_env({"DATABASE_URL": settings.database_url, "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET + "\n"})
    monkeypatch.setattr(runtime, "settings",
                        runtime.settings.with_overrides(stripe_webhook_secret=loaded.stripe_webhook_secret))
    _account, customer = accounts.create()
    response = post_event(client, event("invoice.payment_failed", customer=customer))
    assert response.status_code == 200, response.get_data(as_text=True)
