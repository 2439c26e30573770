"""Webhooks stored together (group commit): one statement for a batch must mean exactly what one
statement per event, in arrival order, means. On the real database and broker."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Any

import pytest
from celery import Celery
from flask import Flask
from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import NullPool

from app import metrics
from app.db import make_engine
from tests.conftest import Accounts, post_event, wait_for
from tests.integration.test_webhook_ingest import count, failed_invoice, queued
from tests.stripe_events import event, unique
from webhooks import store
from webhooks.ingest import EventNotStorable, Ingested, Ingestor
from webhooks.mirror import extract


def item(evt: dict[str, Any]) -> store.Item:
    raw = json.dumps(evt)
    return extract(json.loads(raw)), raw


def flush(engine: Engine, celery_app: Celery, *events: dict[str, Any]) -> list[Ingested | BaseException]:
    """One group commit of these events, as if their requests had arrived together."""
    ingestor = Ingestor(engine, celery_app)
    try:
        return ingestor._flush([item(e) for e in events])
    finally:
        ingestor.close()


def test_events_of_one_account_in_a_batch_queue_one_recompute(accounts: Accounts, engine, celery_app, settings):
    account, customer = accounts.create()
    other, other_customer = accounts.create()
    first, second, third = failed_invoice(customer), failed_invoice(customer), failed_invoice(other_customer)
    results = flush(engine, celery_app, first, second, third)
    assert all(isinstance(r, Ingested) for r in results)
    assert [(r.state, r.account_id, r.enqueued, r.coalesced) for r in results] == [  # type: ignore[union-attr]
        ("accepted", account, True, False), ("accepted", account, False, True), ("accepted", other, True, False)]
    with engine.connect() as conn:
        requests = dict(conn.exec_driver_sql("SELECT account_id, cause FROM recompute_request").fetchall())
    assert requests == {account: first["id"], other: third["id"]}  # the first event of each account asked
    assert count(engine, "SELECT count(*) FROM stripe_event WHERE state = 'accepted'") == 3
    assert count(engine, "SELECT count(*) FROM stripe_invoice") == 3
    assert queued(settings) == 2


def test_each_event_of_a_batch_keeps_its_own_raw_body(accounts: Accounts, engine, celery_app):
    events = [failed_invoice(accounts.create()[1]) for _ in range(4)]
    events[2]["data"]["object"]["description"] = "x" * 3000  # bodies of different lengths
    flush(engine, celery_app, *events)
    with engine.connect() as conn:
        stored = dict(conn.exec_driver_sql("SELECT id, raw_body FROM stripe_event WHERE id = ANY(%(ids)s)",
                                           {"ids": [e["id"] for e in events]}).fetchall())
    assert stored == {e["id"]: json.dumps(e) for e in events}


def test_a_batch_keeps_arrival_order_for_one_invoice(accounts: Accounts, engine, celery_app):
    """A newer paid event, then an older failure of the same invoice, in one batch: the older one
    must not win, as when they arrive one by one (test_webhook_ingest)."""
    _, customer = accounts.create()
    invoice_id, now = unique("in"), int(time.time())
    paid = event("invoice.paid", id=invoice_id, customer=customer, created=now)
    failed = event("invoice.payment_failed", id=invoice_id, customer=customer, created=now - 60)
    assert store.waves([item(paid), item(failed)]) == [[0], [1]]  # the same row: two statements
    results = flush(engine, celery_app, paid, failed)
    assert [r.state for r in results] == ["accepted", "accepted"]  # type: ignore[union-attr]
    with engine.connect() as conn:
        status, first_failed = conn.exec_driver_sql(
            "SELECT status, first_failed_at FROM stripe_invoice WHERE id = %(i)s", {"i": invoice_id}).one()
    assert status == "paid" and first_failed is not None


def test_a_payment_linked_to_an_invoice_of_the_same_batch_is_routed(accounts: Accounts, engine, celery_app):
    """invoice_payment.paid names no customer: its account is found through the invoice, which an
    earlier event of the same batch mirrors. It must see that row (it runs in a later statement)."""
    account, customer = accounts.create()
    invoice_id = unique("in")
    invoice = event("invoice.payment_failed", id=invoice_id, customer=customer)
    link = event("invoice_payment.paid", invoice=invoice_id, paths={"payment.payment_intent": unique("pi")})
    results = flush(engine, celery_app, invoice, link)
    assert [(r.state, r.account_id) for r in results] == [  # type: ignore[union-attr]
        ("accepted", account), ("accepted", account)]


def test_a_redelivery_inside_a_batch_is_a_duplicate(accounts: Accounts, engine, celery_app, settings):
    _, customer = accounts.create()
    evt = failed_invoice(customer)
    results = flush(engine, celery_app, evt, evt)
    assert [r.state for r in results] == ["accepted", "duplicate"]  # type: ignore[union-attr]
    assert count(engine, "SELECT count(*) FROM stripe_event") == 1
    assert queued(settings) == 1


def test_the_group_commit_gives_its_connection_back_as_it_was_lent(accounts: Accounts, settings, celery_app):
    """Its own connection runs in autocommit; handed back to the pool, it must not stay so (the next
    borrower's transaction would commit statement by statement)."""
    _, customer = accounts.create()
    engine = make_engine(settings.database_url, pool_size=1, max_overflow=0)
    try:
        flush(engine, celery_app, failed_invoice(customer))
        with engine.connect() as conn:
            assert conn.connection.driver_connection.autocommit is False  # type: ignore[union-attr]
    finally:
        engine.dispose()


def test_an_event_that_cannot_be_stored_fails_alone(accounts: Accounts, engine, celery_app, settings):
    """A genuine event with an amount beyond bigint breaks the batch's statement: the others are
    stored one by one, and only that event's request fails (422 at the edge)."""
    _, customer = accounts.create()
    good, bad, also_good = failed_invoice(customer), failed_invoice(customer), failed_invoice(unique("cus"))
    bad["data"]["object"]["amount_due"] = 2**70
    results = flush(engine, celery_app, good, bad, also_good)
    assert isinstance(results[1], EventNotStorable) and bad["id"] in str(results[1])
    assert isinstance(results[0], Ingested) and results[0].state == "accepted"
    assert isinstance(results[2], Ingested) and results[2].state == "unroutable"
    with engine.connect() as conn:
        stored = {r[0] for r in conn.exec_driver_sql("SELECT id FROM stripe_event").fetchall()}
    assert stored == {good["id"], also_good["id"]}
    assert queued(settings) == 1


def test_a_batch_of_several_statements_that_fails_stores_none_of_them(accounts: Accounts, engine, celery_app,
                                                                     settings):
    """Two events of one invoice go in two statements (waves); the second breaks. Had the first been
    committed on its own, storing it alone again would find it stored: answered "duplicate", its
    recompute never queued."""
    account, customer = accounts.create()
    invoice_id = unique("in")
    good = failed_invoice(customer, invoice_id)
    bad = event("invoice.paid", id=invoice_id, customer=customer)
    bad["data"]["object"]["amount_due"] = 2**70
    assert store.waves([item(good), item(bad)]) == [[0], [1]]
    results = flush(engine, celery_app, good, bad)
    assert isinstance(results[1], EventNotStorable)
    assert isinstance(results[0], Ingested)
    assert (results[0].state, results[0].account_id, results[0].enqueued) == ("accepted", account, True)
    assert queued(settings) == 1
    assert count(engine, "SELECT count(*) FROM stripe_event") == 1


def test_an_event_missing_a_value_the_mirror_needs_fails_alone(client, accounts: Accounts, engine, celery_app):
    """Signed, but its invoice's amount is beyond what a bigint holds (refused by the database, not
    before): 422 for it alone, not a 500 for every event of its batch. (An invoice naming no customer
    was this test's example; it is now stored unroutable, test_bad_input.)"""
    _, customer = accounts.create()
    bad = failed_invoice(customer)
    bad["data"]["object"]["amount_due"] = 2**63
    response = post_event(client, bad)
    assert response.status_code == 422 and bad["id"] in response.json["reason"]
    good = failed_invoice(customer)
    results = flush(engine, celery_app, good, bad)
    assert isinstance(results[1], EventNotStorable)
    assert isinstance(results[0], Ingested) and results[0].state == "accepted"
    assert count(engine, "SELECT count(*) FROM stripe_event") == 1


def test_an_unstorable_event_answers_422_and_stores_nothing(client, accounts: Accounts, engine, settings):
    _, customer = accounts.create()
    evt = failed_invoice(customer)
    evt["data"]["object"]["amount_due"] = 2**70
    response = post_event(client, evt)
    assert response.status_code == 422
    assert "cannot be stored" in response.json["reason"]
    assert count(engine, "SELECT count(*) FROM stripe_event") == 0
    assert queued(settings) == 0


@pytest.mark.parametrize(("field", "value"), [
    # a due date in milliseconds by mistake (year 33658), or beyond any clock: no datetime holds it
    ("due_date", 10**12), ("due_date", 2**70), ("due_date", 1e300),
    # JSON has no Infinity or NaN, but Python's decoder reads them
    ("amount_due", float("inf")), ("amount_due", float("nan")),
])
def test_a_value_out_of_range_answers_422_and_stores_nothing(client, accounts: Accounts, engine, settings,
                                                            field, value):
    _, customer = accounts.create()
    evt = failed_invoice(customer)
    evt["data"]["object"][field] = value
    if field == "due_date":  # only an invoice sent for payment has one (Stripe: null otherwise)
        evt["data"]["object"]["collection_method"] = "send_invoice"
    response = post_event(client, evt)
    assert response.status_code == 422, response.json
    assert "out of range" in response.json["reason"] and evt["id"] in response.json["reason"]
    assert count(engine, "SELECT count(*) FROM stripe_event") == 0
    assert queued(settings) == 0


@pytest.mark.parametrize("value", ["manual\x00", "manual\ud800"], ids=["nul", "lone-surrogate"])
def test_text_nothing_can_store_answers_422_and_stores_nothing(client, accounts: Accounts, engine, value):
    """JSON may carry \\u0000 and a lone surrogate escape; PostgreSQL text (UTF-8) holds neither. The
    event is refused with a reason, not a 500."""
    _, customer = accounts.create()
    evt = failed_invoice(customer)
    evt["data"]["object"]["billing_reason"] = value
    response = post_event(client, evt)
    assert response.status_code == 422, response.json
    assert evt["id"] in response.json["reason"]
    assert count(engine, "SELECT count(*) FROM stripe_event") == 0


def batch_sizes() -> dict[float, float]:
    """Cumulative counts of the batch-size histogram, by bucket."""
    samples = {}
    for metric in metrics.WEBHOOK_BATCH.collect():
        for sample in metric.samples:
            if sample.name.endswith("_bucket"):
                samples[float(sample.labels["le"])] = sample.value
    return samples


def test_requests_waiting_together_share_one_commit(flask_app: Flask, accounts: Accounts, engine, settings):
    """Through HTTP: the first request's statement waits on a row lock the test holds; three more
    arrive meanwhile and are committed together by the next flush; everyone gets their answer."""
    blocked, blocked_customer = accounts.create()
    others = [accounts.create() for _ in range(3)]
    before = batch_sizes()
    lock = engine.connect()
    lock.exec_driver_sql("INSERT INTO recompute_request (account_id, trigger) VALUES (%(a)s, 'TEST')",
                         {"a": blocked})  # uncommitted: ingest's upsert of this row waits for it
    answers: dict[str, Any] = {}

    def post(customer: str) -> None:
        answers[customer] = post_event(flask_app.test_client(), failed_invoice(customer))

    first = threading.Thread(target=post, args=(blocked_customer,))
    first.start()
    _wait_until_waiting_on_lock(engine)
    rest = [threading.Thread(target=post, args=(customer,)) for _, customer in others]
    for t in rest:
        t.start()
    ingestor: Ingestor = flask_app.extensions["webhook_ingest"]
    wait_for(lambda: len(ingestor.group.queue) == 3, message="three requests queued behind the blocked flush")
    lock.rollback()  # the blocked statement proceeds
    lock.close()
    for t in [first, *rest]:
        t.join(20)
    customers = [blocked_customer, *(c for _, c in others)]
    assert {c: a.status_code for c, a in answers.items()} == dict.fromkeys(customers, 200)
    assert all(a.json["state"] == "accepted" and a.json["enqueued"] for a in answers.values())
    after = batch_sizes()
    assert after[4.0] - before[4.0] - (after[2.0] - before[2.0]) == 1  # one batch of 3 (in the le=4 bucket)
    assert queued(settings) == 4


def test_a_connection_lost_mid_statement_answers_503_then_the_pool_recovers(flask_app: Flask, accounts: Accounts,
                                                                             engine, settings):
    """The database ends the connection while the webhook's statement runs (a restart, a failover):
    503 so Stripe redelivers, never a 500, nothing half-stored; the pool drops that connection and
    the redelivery is stored."""
    account, customer = accounts.create()
    lock = engine.connect()
    lock.exec_driver_sql("INSERT INTO recompute_request (account_id, trigger) VALUES (%(a)s, 'TEST')", {"a": account})
    evt = failed_invoice(customer)
    answer: dict[str, Any] = {}
    request = threading.Thread(target=lambda: answer.update(r=post_event(flask_app.test_client(), evt)))
    request.start()
    _wait_until_waiting_on_lock(engine)
    killer = create_engine(settings.database_url, poolclass=NullPool)
    with killer.connect() as conn:
        killed = conn.exec_driver_sql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE '%%EXECUTE dunning_ingest%%'").scalar_one()
    killer.dispose()
    request.join(20)
    lock.rollback()
    lock.close()
    assert killed == 1
    assert answer["r"].status_code == 503, answer["r"].json
    assert answer["r"].headers["Retry-After"]
    assert count(engine, "SELECT count(*) FROM stripe_event") == 0
    redelivered = post_event(flask_app.test_client(), evt)
    assert redelivered.status_code == 200 and redelivered.json["state"] == "accepted"


def _wait_until_waiting_on_lock(engine: Engine) -> None:
    """Until an ingest statement (and no other) of this database waits on a lock."""
    def waiting() -> bool:
        with engine.connect() as conn:
            return bool(conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE '%%EXECUTE dunning_ingest%%'").scalar_one())
    wait_for(waiting, message="the first webhook's statement to wait on the lock")


def received(event_type: str, state: str) -> float:
    for metric in metrics.WEBHOOKS_RECEIVED.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels == {"type": event_type, "state": state}:
                return sample.value
    return 0.0


def test_every_event_of_a_batch_is_counted_by_its_state(accounts: Accounts, engine, celery_app):
    """Counted once per kind in a batch, so the counter must still move by one per event."""
    _, customer = accounts.create()
    _, other = accounts.create()
    events = (failed_invoice(customer), failed_invoice(other), failed_invoice(unique("cus")))
    accepted = received("invoice.payment_failed", "accepted")
    unroutable = received("invoice.payment_failed", "unroutable")
    results = flush(engine, celery_app, *events)
    assert [r.state for r in results if isinstance(r, Ingested)] == ["accepted", "accepted", "unroutable"]
    assert received("invoice.payment_failed", "accepted") == accepted + 2
    assert received("invoice.payment_failed", "unroutable") == unroutable + 1


def test_an_ingestor_dropped_without_closing_leaves_no_autocommit_connection_in_the_pool(
        accounts: Accounts, settings, celery_app):
    """The group commit's connection runs in autocommit. An ingestor garbage collected without
    close() (an app built and dropped) gave it back to the pool as it was, and every later unit of
    work on it committed statement by statement: a recompute's transaction-scoped account lock and
    its take of the request ended at once."""
    import gc

    from app.db import unit_of_work

    engine = make_engine(settings.database_url, pool_size=1, max_overflow=0)
    try:
        ingestor = Ingestor(engine, celery_app)
        evt = failed_invoice(accounts.create()[1])
        assert isinstance(ingestor.ingest(evt, json.dumps(evt)), Ingested)
        del ingestor
        gc.collect()
        with unit_of_work(engine) as conn:  # the pool's one connection: the ingestor's
            assert conn.connection.driver_connection.autocommit is False  # type: ignore[union-attr]
            assert conn.exec_driver_sql("SELECT now() = statement_timestamp()").scalar() is False
    finally:
        engine.dispose()


def test_the_others_of_a_batch_whose_leader_ended_mid_flush_answer_503(flask_app: Flask, engine, celery_app):
    """What webhooks/group_commit.py raises in the other requests of a batch whose leading request ended
    in the middle of its flush (tests/unit/test_group_commit.py): whether their events were stored is
    not known, so 503 with Retry-After (Stripe redelivers; a stored event's redelivery is a duplicate),
    never the leader's GreenletExit, which gunicorn drops without an answer."""
    raised = Ingestor(engine, celery_app).group.interrupted()
    assert isinstance(raised, Exception)  # what the app's error handlers answer
    with flask_app.test_request_context("/webhooks/stripe", method="POST"):
        response = flask_app.make_response(flask_app.handle_user_exception(raised))
    assert response.status_code == 503 and response.headers["Retry-After"]


class CutAfterCommit:
    """A TCP relay in front of PostgreSQL that, once armed, passes the client's COMMIT on to the
    server and then ends the connection instead of relaying the server's answer: the transaction is
    committed and the client never hears so (a network cut, a proxy or failover at that moment)."""

    COMMIT = b"Q\x00\x00\x00\x0bCOMMIT\x00"  # a simple-protocol Query message, as psycopg2 sends it

    def __init__(self, host: str, port: int) -> None:
        import socket

        self.target = (host, port)
        self.armed = threading.Event()
        self.cut = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.target)
            committed = threading.Event()
            threading.Thread(target=self._pipe, args=(client, server, committed, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, committed, False), daemon=True).start()

    def _pipe(self, source: Any, sink: Any, committed: threading.Event, upstream: bool) -> None:
        import socket

        try:
            while data := source.recv(65536):
                if not upstream and committed.is_set():  # the server's answer to the COMMIT: dropped
                    self.cut.set()
                    break
                if upstream and self.armed.is_set() and self.COMMIT in data:
                    committed.set()  # before it is sent: its answer may come back at once
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):  # shutdown first: the other pipe's thread is blocked reading one
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                end.close()

    def close(self) -> None:
        self.listener.close()


def test_a_connection_lost_after_a_batchs_commit_was_sent_answers_503_and_its_request_is_redriven(
        flask_app: Flask, accounts: Accounts, engine, settings, celery_app):
    """A batch of two statements (two events of one invoice) runs as one transaction, committed by
    its own COMMIT. The connection is lost once that COMMIT is sent, before its answer: the events
    are stored, the requests must answer 503 (Stripe redelivers), not the 500 of an unexpected
    error. The redelivery is a duplicate and queues nothing; the request the batch created, never
    enqueued, is sent by beat's stale-request re-drive."""
    from urllib.parse import urlsplit

    from app.redrive import redrive

    account, customer = accounts.create()
    invoice_id, now = unique("in"), int(time.time())
    paid = event("invoice.paid", id=invoice_id, customer=customer, created=now)
    failed = event("invoice.payment_failed", id=invoice_id, customer=customer, created=now - 60)
    assert store.waves([item(paid), item(failed)]) == [[0], [1]]
    db = urlsplit(settings.database_url)
    relay = CutAfterCommit(db.hostname or "127.0.0.1", db.port or 5432)
    relayed = make_engine(db._replace(netloc=db.netloc.replace(f":{db.port}", f":{relay.port}")).geturl())
    ingestor = Ingestor(relayed, celery_app)
    before = queued(settings)
    try:
        ingestor._connection()  # connected and set up through the relay before it is armed
        relay.armed.set()
        with pytest.raises(Exception) as lost:
            ingestor._flush([item(paid), item(failed)])
        assert relay.cut.is_set()
    finally:
        ingestor.close()
        relayed.dispose()
        relay.close()
    with flask_app.test_request_context("/webhooks/stripe", method="POST"):
        answer = flask_app.make_response(flask_app.handle_user_exception(lost.value))
    assert answer.status_code == 503, answer.json
    assert count(engine, "SELECT count(*) FROM stripe_event WHERE id = ANY(%(ids)s)",
                 ids=[paid["id"], failed["id"]]) == 2  # committed
    assert queued(settings) == before  # nothing enqueued
    again = post_event(flask_app.test_client(), paid)
    assert again.status_code == 200 and again.json["state"] == "duplicate" and not again.json["enqueued"]
    assert queued(settings) == before
    assert redrive(engine, celery_app, stale_after_seconds=0)["sent"] == 1
    assert queued(settings) == before + 1
    assert count(engine, "SELECT count(*) FROM recompute_request WHERE account_id = %(a)s", a=account) == 1
