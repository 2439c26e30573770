"""Webhook ingest and tasks when the infrastructure under them misbehaves: a database that refuses work
for now, a statement timeout, a hung broker, a network cut. On the real database and broker."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import Engine

from app import metrics
from app.db import DatabaseUnavailable, Prepared, fetch_prepared_row, is_connection_error, make_engine
from tasks.failures import INFRASTRUCTURE, FailureKind, classify
from tests.conftest import Accounts, post_event
from tests.integration.test_webhook_ingest import count, failed_invoice
from webhooks.ingest import Ingestor
from webhooks.mirror import extract


def rejected(reason: str) -> float:
    for metric in metrics.WEBHOOKS_REJECTED.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels == {"reason": reason}:
                return sample.value
    return 0.0


def item(evt: dict[str, Any]) -> tuple[Any, str]:
    raw = json.dumps(evt)
    return extract(json.loads(raw)), raw


# --- a database that refuses work for now: read only, out of resources ----------------------------

def test_a_read_only_database_answers_a_webhook_503_counted_unavailable(flask_app: Flask, accounts: Accounts,
                                                                       engine: Engine):
    """After a failover the old primary (or a standby the client reached) refuses writes with SQLSTATE
    25006: "not now", as a database gone is; 503 so Stripe redelivers, never a 500."""
    _, customer = accounts.create()
    ingestor: Ingestor = flask_app.extensions["webhook_ingest"]
    ingestor._connection().exec_driver_sql("SET default_transaction_read_only = on")
    unavailable, error = rejected("unavailable"), rejected("error")
    response = post_event(flask_app.test_client(), failed_invoice(customer))
    assert response.status_code == 503, response.json
    assert response.headers["Retry-After"]
    assert rejected("unavailable") == unavailable + 1 and rejected("error") == error
    assert count(engine, "SELECT count(*) FROM stripe_event") == 0
    # The connection that met it was dropped: the redelivery is stored on a new one.
    assert post_event(flask_app.test_client(), failed_invoice(customer)).status_code == 200


@pytest.mark.parametrize("sqlstate", ["disk_full", "out_of_memory", "too_many_connections",
                                      "read_only_sql_transaction"])
def test_a_server_refusing_for_now_is_unavailable_on_every_path(engine: Engine, sqlstate: str):
    """The same SQLSTATEs raised by the server, read through the hot paths' cursor (DatabaseUnavailable)
    and through SQLAlchemy: a connection error to the web's error handlers, and infrastructure to the
    tasks' failure policy (retried with backoff, not a bug's 3 retries then dead)."""
    raising = f"DO $$ BEGIN RAISE EXCEPTION 'refused' USING ERRCODE = '{sqlstate}'; END $$"
    with engine.connect() as conn:
        conn.exec_driver_sql("CREATE FUNCTION pg_temp.refuse() RETURNS int LANGUAGE plpgsql AS "
                             f"$f$ BEGIN RAISE EXCEPTION 'refused' USING ERRCODE = '{sqlstate}'; END $f$")
        with pytest.raises(DatabaseUnavailable) as hot:
            fetch_prepared_row(conn, (Prepared(f"refuse_{sqlstate}", "SELECT pg_temp.refuse()"), ()))
        conn.rollback()
        with pytest.raises(Exception) as wrapped:
            conn.exec_driver_sql(raising)
        conn.rollback()
    for exc in (hot.value, wrapped.value, wrapped.value.orig):  # type: ignore[attr-defined]
        assert is_connection_error(exc), exc
        assert classify(exc) is FailureKind.DATABASE_UNAVAILABLE, exc
    assert FailureKind.DATABASE_UNAVAILABLE in INFRASTRUCTURE


def test_a_refusal_for_now_through_sqlalchemy_answers_503(flask_app: Flask, engine: Engine):
    with engine.connect() as conn, pytest.raises(Exception) as refused:
        conn.exec_driver_sql("DO $$ BEGIN RAISE EXCEPTION 'refused' USING ERRCODE = 'disk_full'; END $$")
    with flask_app.test_request_context("/webhooks/stripe", method="POST"):
        answer = flask_app.make_response(flask_app.handle_user_exception(refused.value))
    assert answer.status_code == 503 and answer.headers["Retry-After"]


# --- a network cut in the middle of a query -------------------------------------------------------

def _socket_option(engine: Engine, option: int) -> int:
    raw = engine.raw_connection()
    try:
        sock = socket.socket(fileno=raw.driver_connection.fileno())  # type: ignore[union-attr]
        try:
            return sock.getsockopt(socket.IPPROTO_TCP, option)
        finally:
            sock.detach()  # the descriptor stays libpq's
    finally:
        raw.close()


def test_every_session_bounds_unacknowledged_data_and_probes_an_idle_wait(settings):
    """A cut while a query is on its way (its data unacknowledged) ended the connection only once the
    kernel gave up retransmitting (about 15 minutes), and one while waiting for the answer after 2
    hours of silence: the group commit's leader, every webhook behind it, or a recompute, held as
    long. Every session has TCP_USER_TIMEOUT and the client's keepalives, unless the URL says else."""
    engine = make_engine(settings.database_url)
    try:
        assert _socket_option(engine, socket.TCP_USER_TIMEOUT) == 30_000
        assert _socket_option(engine, socket.TCP_KEEPIDLE) == 30
        assert _socket_option(engine, socket.TCP_KEEPCNT) == 3
    finally:
        engine.dispose()
    sep = "&" if "?" in settings.database_url else "?"
    engine = make_engine(f"{settings.database_url}{sep}tcp_user_timeout=5000&keepalives_idle=60&connect_timeout=7")
    try:
        assert _socket_option(engine, socket.TCP_USER_TIMEOUT) == 5000  # the URL's own
        assert _socket_option(engine, socket.TCP_KEEPIDLE) == 60
        raw = engine.raw_connection()
        try:
            assert raw.driver_connection.info.dsn_parameters["connect_timeout"] == "7"  # type: ignore[union-attr]
        finally:
            raw.close()
    finally:
        engine.dispose()


# --- a statement timeout is the database slow, not one account's lock ------------------------------

def stored(engine: Engine, events: list[dict[str, Any]]) -> int:
    return count(engine, "SELECT count(*) FROM stripe_event WHERE id = ANY(%(ids)s)", ids=[e["id"] for e in events])


@contextmanager
def behind_a_held_request(engine: Engine, celery_app: Any, account: str, session_sql: str) -> Iterator[Ingestor]:
    """An Ingestor whose session first runs ``session_sql`` (its timeouts), while the test holds an
    uncommitted request row of ``account`` (ingest's upsert of it waits); both let go at the end (the
    session's timeouts go with its connection)."""
    lock = engine.connect()
    lock.exec_driver_sql("INSERT INTO recompute_request (account_id, trigger) VALUES (%(a)s, 'TEST')", {"a": account})
    ingestor = Ingestor(engine, celery_app)
    try:
        ingestor._connection().exec_driver_sql(session_sql)
        yield ingestor
    finally:
        lock.rollback()
        lock.close()
        ingestor._drop_connection()


def test_a_batch_past_its_statement_timeout_answers_each_request_at_once(accounts: Accounts, engine: Engine,
                                                                         celery_app):
    """A batch cancelled by statement_timeout (the database slow; here a wait the statement timeout
    ends before lock_timeout would) was run again event by event, each allowed the statement timeout
    again: a flush of 64 held the worker for minutes. Every request of the batch answers TimedOut
    (503) at once, and nothing of it is stored; only a lock timeout splits a batch."""
    from app.db import LockNotAvailable, TimedOut

    blocked, blocked_customer = accounts.create()
    _, other_customer = accounts.create()
    events = [failed_invoice(blocked_customer), failed_invoice(other_customer)]
    # statement_timeout ends the wait before lock_timeout's 5 s would. The flush raises: the group
    # commit hands that to every request of the batch.
    with (behind_a_held_request(engine, celery_app, blocked, "SET statement_timeout = '300ms'") as ingestor,
          pytest.raises(TimedOut) as raised):
        ingestor._flush([item(e) for e in events])
    assert not isinstance(raised.value, LockNotAvailable)
    assert stored(engine, events) == 0


def test_a_split_batch_stops_at_the_first_event_that_meets_the_database_slow(accounts: Accounts, engine: Engine,
                                                                               celery_app):
    """A batch split after a lock timeout (each event alone, waiting at most 250 ms for a lock): once an
    event alone runs past statement_timeout, the database is what is slow; the rest of the batch
    answers the same at once instead of each waiting for it again."""
    from app.db import LockNotAvailable, TimedOut

    blocked, blocked_customer = accounts.create()
    others = [accounts.create()[1] for _ in range(2)]
    events = [failed_invoice(blocked_customer), *(failed_invoice(c) for c in others)]
    # The batch meets lock_timeout first (split); the blocked event alone meets statement_timeout
    # before the split's brief lock wait (250 ms) ends.
    with behind_a_held_request(engine, celery_app, blocked,
                               "SET lock_timeout = '50ms'; SET statement_timeout = '150ms'") as ingestor:
        outcomes = ingestor._flush([item(e) for e in events])
    assert all(isinstance(o, TimedOut) and not isinstance(o, LockNotAvailable) for o in outcomes), outcomes
    assert stored(engine, events) == 0


def test_a_batch_past_one_accounts_lock_timeout_still_stores_the_others(accounts: Accounts, engine: Engine,
                                                                         celery_app):
    """Contention still splits: only the blocked account's request answers 503."""
    from app.db import LockNotAvailable
    from webhooks.ingest import Ingested

    blocked, blocked_customer = accounts.create()
    _, other_customer = accounts.create()
    events = [failed_invoice(blocked_customer), failed_invoice(other_customer)]
    with behind_a_held_request(engine, celery_app, blocked, "SET lock_timeout = '50ms'") as ingestor:
        outcomes = ingestor._flush([item(e) for e in events])
    assert isinstance(outcomes[0], LockNotAvailable)
    assert isinstance(outcomes[1], Ingested) and outcomes[1].state == "accepted"


# --- the broker refuses: every event waiting on the request shows it --------------------------------

def test_every_event_of_a_batch_whose_request_the_broker_refused_shows_enqueue_failed(
        settings, accounts: Accounts, engine: Engine):
    """Only the event that created its account's request was marked enqueue_failed; another event of
    the same account in the batch (coalesced into that request, not queued either) stayed accepted,
    and an operator looking for the events waiting on the broker missed it. An event coalesced into
    a request queued before is not waiting on this refusal."""
    from tasks.factory import make_celery
    from webhooks.ingest import Ingested

    dead_broker = make_celery(settings.with_overrides(broker_url="redis://127.0.0.1:1/0"))
    refused, refused_customer = accounts.create()
    queued_before, queued_customer = accounts.create()
    with engine.begin() as conn:  # a request of its own already pending (queued by an earlier webhook)
        conn.exec_driver_sql("INSERT INTO recompute_request (account_id, trigger) VALUES (%(a)s, 'TEST')",
                             {"a": queued_before})
    events = [failed_invoice(refused_customer), failed_invoice(refused_customer), failed_invoice(queued_customer)]
    ingestor = Ingestor(engine, dead_broker)
    try:
        outcomes = ingestor._flush([item(e) for e in events])
    finally:
        ingestor.close()
    assert all(isinstance(o, Ingested) for o in outcomes)
    assert [(o.state, o.account_id, o.enqueue_failed, o.coalesced) for o in outcomes] == [  # type: ignore[union-attr]
        ("enqueue_failed", refused, True, False), ("enqueue_failed", refused, True, True),
        ("accepted", queued_before, False, True)]
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, state FROM stripe_event WHERE id = ANY(%(ids)s)",
                                    {"ids": [e["id"] for e in events]}).fetchall()
    states: dict[str, str] = dict(rows)
    assert [states[e["id"]] for e in events] == ["enqueue_failed", "enqueue_failed", "accepted"]


# --- a hung broker, a pool with no connection free: bounded waits ---------------------------------

class HungRedis:
    """A TCP server that takes connections and never answers (a Redis hung, or a network that drops
    its answers): counts the connections made to it."""

    def __init__(self) -> None:
        import threading

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.accepted.append(conn)  # held open, never read nor answered

    def close(self) -> None:
        self.listener.close()
        for conn in self.accepted:
            conn.close()


def test_a_hung_broker_holds_a_flush_for_the_enqueue_bound_once_and_its_events_wait_for_beat(
        settings, accounts: Accounts, engine: Engine):
    """The lane waited for Redis' answer its transport's 10 s, then tried again on a new connection:
    about 20 s for the flush and every webhook of the process queued behind it. The events are
    committed: the flush waits at most ENQUEUE_BOUND (2 s) on one connection, marks them
    enqueue_failed and answers 200; beat's re-drive sends them. Other senders keep their timeouts."""
    from app.dispatch import ATTEMPTS
    from app.redis_lane import lane_for
    from tasks.factory import make_celery
    from webhooks.ingest import ENQUEUE_BOUND, Ingested

    hung = HungRedis()
    app = make_celery(settings.with_overrides(broker_url=f"redis://127.0.0.1:{hung.port}/0"))
    _, customer = accounts.create()
    evt = failed_invoice(customer)
    ingestor = Ingestor(engine, app)
    try:
        [outcome] = ingestor._flush([item(evt)])
    finally:
        ingestor.close()
        hung.close()
    assert isinstance(outcome, Ingested) and outcome.state == "enqueue_failed" and outcome.enqueue_failed
    assert count(engine, "SELECT count(*) FROM stripe_event WHERE id = %(i)s AND state = 'enqueue_failed'",
                 i=evt["id"]) == 1
    assert ATTEMPTS == 2 and len(hung.accepted) == 1  # not tried again after the timeout
    bounded: Any = lane_for(app, ENQUEUE_BOUND).connection
    assert ENQUEUE_BOUND <= 2 and bounded.socket_timeout == ENQUEUE_BOUND
    assert bounded.socket_connect_timeout == ENQUEUE_BOUND
    other: Any = lane_for(app).connection
    assert other.socket_timeout == 10  # the others' own lane, as before


def test_a_failover_list_of_hung_brokers_does_not_hold_a_flush_for_ever(
        settings, accounts: Accounts, engine: Engine, monkeypatch: pytest.MonkeyPatch):
    """A failover list of Redis brokers is sent through kombu, not the lane (43649e3), and kombu's
    Redis transport waits for an answer for ever unless told otherwise: a hung broker held the flush,
    and every webhook of the process queued behind it, for good. Each broker's answer is waited for
    at most the transport's socket_timeout now; then the next of the list, then enqueue_failed (the
    events are committed: beat's re-drive sends them)."""
    import threading

    from tasks import factory
    from webhooks.ingest import Ingested

    assert make_celery_options(settings)["socket_timeout"] == factory.BROKER_SOCKET_TIMEOUT <= 10
    monkeypatch.setattr(factory, "BROKER_SOCKET_TIMEOUT", 1)  # the same path, a shorter wait for the test
    first, second = HungRedis(), HungRedis()
    app = factory.make_celery(settings.with_overrides(
        broker_url=f"redis://127.0.0.1:{first.port}/0;redis://127.0.0.1:{second.port}/0"))
    _, customer = accounts.create()
    evt = failed_invoice(customer)
    ingestor = Ingestor(engine, app)
    outcomes: list[Any] = []
    flushing = threading.Thread(target=lambda: outcomes.extend(ingestor._flush([item(evt)])), daemon=True)
    try:
        flushing.start()
        flushing.join(60)
        assert not flushing.is_alive(), "the flush still waits on the hung brokers"
    finally:
        first.close()
        second.close()
        flushing.join()
        ingestor.close()
    [outcome] = outcomes
    assert isinstance(outcome, Ingested) and outcome.state == "enqueue_failed" and outcome.enqueue_failed
    assert count(engine, "SELECT count(*) FROM stripe_event WHERE id = %(i)s AND state = 'enqueue_failed'",
                 i=evt["id"]) == 1
    assert first.accepted and second.accepted  # each broker of the list was tried


def make_celery_options(settings: Any) -> dict[str, Any]:
    from tasks.factory import make_celery

    return dict(make_celery(settings.with_overrides(
        broker_url=settings.broker_url + ";" + settings.broker_url)).conf.broker_transport_options)


def test_a_webhook_waiting_for_a_free_database_connection_answers_503_within_the_pool_bound(
        settings, celery_app, accounts: Accounts):
    """The group commit taking a new connection (and any web request) waited up to SQLAlchemy's
    default 30 s for one to be free, past Stripe's patience for the delivery: now POOL_TIMEOUT (5 s),
    then 503 with Retry-After. A task meeting it retries as for a database unavailable."""
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from app import create_app
    from app.db import POOL_TIMEOUT
    from app.runtime import Runtime

    runtime = Runtime.build(settings)
    runtime.engine.dispose()
    runtime.engine = make_engine(settings.database_url, pool_size=1, max_overflow=0)
    try:
        assert runtime.engine.pool.timeout() == POOL_TIMEOUT <= 5  # type: ignore[attr-defined]
        app = create_app(settings, runtime=runtime, celery=celery_app)
        _, customer = accounts.create()
        with runtime.engine.connect():  # the pool's only connection, busy
            response = post_event(app.test_client(), failed_invoice(customer))
        assert response.status_code == 503 and response.headers["Retry-After"], response.json
    finally:
        runtime.engine.dispose()
    assert classify(PoolTimeout("no connection free")) is FailureKind.DATABASE_UNAVAILABLE
