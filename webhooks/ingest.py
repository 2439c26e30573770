"""Ingest verified events: store once, mirror, request a recompute, commit, then enqueue.

The events of concurrent requests share the work (webhooks/group_commit.py): one statement and
one commit for all of them (webhooks/store.py), then one broker round trip for their recomputes
(app/dispatch.py). A request answers only after both, so its 200 still means "stored, and either
queued or left for beat to re-drive".
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

from celery import Celery
from sqlalchemy import Connection, Engine

from app import metrics
from app.db import (
    LOCK_TIMEOUT,
    Conflict,
    DatabaseUnavailable,
    LockNotAvailable,
    TimedOut,
    ValueRejected,
    is_connection_error,
    unit_of_work,
)
from app.dispatch import BrokerUnavailable, TaskCall, recompute_call, send_many
from app.payments import bad_debt_webhook
from webhooks import store
from webhooks.group_commit import GroupCommit
from webhooks.mirror import Extracted, OutOfRange, extract

log = logging.getLogger(__name__)

MAX_BATCH = 64  # events per group commit; more waiting form the next one
CONFLICT_ATTEMPTS = 3
# After a batch timed out on one account's lock, how long each of its events alone waits for one.
BRIEF_LOCK_WAIT = "250ms"
# The most a flush waits for the broker (its connect, write, read; no second try after a timeout): its
# events are committed, so a hung Redis leaves them enqueue_failed for beat's re-drive rather than
# holding this flush, and every webhook of the process queued behind it, for the transport's 10 s twice.
ENQUEUE_BOUND = 2.0


class EventNotStorable(ValueRejected):
    """A genuine event holding a value the database cannot take (out of range, a NUL character)."""


class BatchInterrupted(DatabaseUnavailable):
    """The request leading this event's group commit ended in the middle of it (its greenlet killed,
    a gevent Timeout): whether the event was stored is not known. 503, as for a database gone: Stripe
    redelivers; a stored event's redelivery is a duplicate, and its request, if the flush ended
    before enqueueing it, is sent by beat's stale-request re-drive."""


def _interrupted() -> BatchInterrupted:
    return BatchInterrupted("the group commit this webhook was in ended in the middle (its leading request ended)")


@dataclass(frozen=True)
class Ingested:
    event_id: str
    type: str
    state: str  # accepted | unroutable | ignored | duplicate | enqueue_failed
    account_id: str | None = None
    enqueued: bool = False
    coalesced: bool = False
    enqueue_failed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"received": True, "id": self.event_id, "type": self.type, "state": self.state,
                "account_id": self.account_id, "enqueued": self.enqueued, "coalesced": self.coalesced}


class Ingestor:
    """Webhook ingest of one web process (its threads share the group commit)."""

    def __init__(self, engine: Engine, celery_app: Celery, max_batch: int = MAX_BATCH) -> None:
        self.engine = engine
        self.celery_app = celery_app
        self.group: GroupCommit[store.Item, Ingested] = GroupCommit(self._flush, max_batch, _interrupted)
        self.connection: Connection | None = None

    def ingest(self, event: dict[str, Any], raw: str) -> Ingested:
        """Raises NotAStripeEvent, EventNotStorable, or what the database raised (unreachable: 503)."""
        try:
            ex = extract(event)
        except OutOfRange as exc:
            raise EventNotStorable(f"event {event.get('id')} cannot be stored: {exc}") from exc
        if bad_debt_webhook.concerns(ex.type, ex.payment_intent):
            return self._ingest_payment_outcome(ex, event, raw)
        return self.group.submit((ex, raw))

    def _flush(self, items: list[store.Item]) -> list[Ingested | BaseException]:
        metrics.WEBHOOK_BATCH.observe(len(items))
        stored: list[store.Stored | BaseException | None]
        try:
            stored = list(self._store(items))
        except ValueRejected as exc:
            # An event's values broke the statement (nothing of it was stored): each on its own,
            # so that only that event's request fails.
            stored = self._store_each(items) if len(items) > 1 else [_not_storable(items[0], exc)]
        except LockNotAvailable:
            # A row of one account held past lock_timeout (a long recompute of it): nothing of the
            # batch was stored. The other accounts' events are not held back with it: each event on
            # its own, waiting only briefly for a lock (the holder is still busy), so that only the
            # blocked account's requests answer 503 (Stripe redelivers them).
            # Not a statement past statement_timeout (TimedOut, raised on to every request of the
            # batch): the database itself is slow, and each event alone would again be given its
            # 10 s, holding the batch and every webhook of this process behind it for minutes.
            if len(items) == 1:
                raise
            with self._brief_lock_waits():
                stored = self._store_each(items)
        return self._answer([ex for ex, _raw in items], stored)

    def _store_each(self, items: list[store.Item]) -> list[store.Stored | BaseException | None]:
        """Each event on its own, in order. Once one meets the database slow or gone (a statement
        timeout, a connection error: nothing about the event), the rest of the batch answers the
        same at once (503: Stripe redelivers them) instead of waiting for it again, each in turn."""
        stored: list[store.Stored | BaseException | None] = []
        for item in items:
            done = self._store_alone(item)
            stored.append(done)
            if isinstance(done, BaseException) and _infrastructure(done):
                return stored + [done] * (len(items) - len(stored))
        return stored

    @contextlib.contextmanager
    def _brief_lock_waits(self) -> Iterator[None]:
        """The group commit's connection waits at most BRIEF_LOCK_WAIT for a lock inside (a setting
        of the session: it runs in autocommit), LOCK_TIMEOUT again after."""
        conn = self._connection()
        self._set_lock_timeout(conn, BRIEF_LOCK_WAIT)
        try:
            yield
        finally:
            if self.connection is conn:  # not dropped meanwhile (a lost connection is not reused)
                with contextlib.suppress(Exception):  # dropped by _set_lock_timeout if it fails
                    self._set_lock_timeout(conn, LOCK_TIMEOUT)

    def _set_lock_timeout(self, conn: Connection, value: str) -> None:
        try:
            conn.exec_driver_sql(f"SET lock_timeout = '{value}'")
            conn.commit()  # ends SQLAlchemy's bookkeeping; psycopg2 sends nothing
        except BaseException:
            self._drop_connection()
            raise

    def _answer(self, exs: list[Extracted], stored: list[store.Stored | BaseException | None]
                ) -> list[Ingested | BaseException]:
        """After the commit: enqueue the recomputes the events created, count them, and say what
        each request answers."""
        calls: list[TaskCall | None] = []
        outcomes: list[Ingested | BaseException] = []
        for ex, result in zip(exs, stored, strict=True):
            outcome, call = _outcome(ex, result)
            outcomes.append(outcome)
            calls.append(call)
        self._enqueue(outcomes, calls)
        _count(outcomes)
        return outcomes

    def _store(self, items: list[store.Item]) -> list[store.Stored | None]:
        """Each statement is atomic on its own (autocommit: no BEGIN/COMMIT round trips); one that
        lost a race with another web process's statement (a deadlock) is run again. One that waited
        past lock_timeout is not: the batch's requests answer 503 and Stripe redelivers them."""
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            conn = self._connection()
            try:
                return store.ingest_events(conn, items)
            except (ValueRejected, TimedOut):  # nothing was written; the connection is fine
                # TimedOut: a lock held 5 s (lock_timeout) is held by a long transaction, likely still
                # running; waiting for it again would hold every request of the batch, and every one
                # queued behind it in this process, 5 s more each time.
                raise
            except Conflict:  # rolled back at once (a deadlock's loser); the connection is fine
                if attempt == CONFLICT_ATTEMPTS:
                    raise
            except BaseException:
                self._drop_connection()  # lost, or in an unknown state: a new one next time
                raise
            finally:
                if self.connection is not None:
                    self.connection.commit()  # ends SQLAlchemy's bookkeeping; psycopg2 sends nothing
        raise AssertionError("unreachable")

    def _connection(self) -> Connection:
        """The group commit's own connection, in autocommit: only the leader of a flush uses it (one
        at a time), so a flush skips the pool's checkout and return."""
        if self.connection is None:
            conn = self.engine.connect()
            # psycopg2's own flag rather than SQLAlchemy's isolation_level option, which costs a round
            # trip to set: with it psycopg2 sends no BEGIN, and SQLAlchemy's commit sends nothing.
            conn.connection.driver_connection.autocommit = True  # type: ignore[union-attr]
            self.connection = conn
        return self.connection

    def close(self) -> None:
        """Give the group commit's connection back to the pool (the next flush takes another)."""
        conn, self.connection = self.connection, None
        if conn is not None:
            conn.connection.driver_connection.autocommit = False  # type: ignore[union-attr]  # as the pool lent it
            conn.close()

    def _drop_connection(self) -> None:
        conn, self.connection = self.connection, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.invalidate()
                conn.close()

    def _store_alone(self, item: store.Item) -> store.Stored | BaseException | None:
        try:
            return self._store([item])[0]
        except ValueRejected as exc:
            return _not_storable(item, exc)
        except Exception as exc:
            return exc

    def _enqueue(self, outcomes: list[Ingested | BaseException], calls: list[TaskCall | None]) -> None:
        wanted = [i for i, call in enumerate(calls) if call is not None]
        try:
            send_many(self.celery_app, [calls[i] for i in wanted], bound=ENQUEUE_BOUND)  # type: ignore[misc]
        except BrokerUnavailable as exc:
            # Accepted and committed: the pending requests stay and beat re-drives them. Every event
            # of the batch waiting on one of them shows it, as the re-drive marks the events it routes:
            # the one that created its account's request, and those of the same account coalesced
            # into it (the same request, not queued either).
            log.warning("%d recomputes not queued, beat will re-drive: %s", len(wanted), exc)
            accounts = {o.account_id for o in (outcomes[i] for i in wanted) if isinstance(o, Ingested)}
            waiting = [i for i, o in enumerate(outcomes)
                       if isinstance(o, Ingested) and o.state == "accepted" and o.account_id in accounts]
            with unit_of_work(self.engine) as conn:
                conn.exec_driver_sql("UPDATE stripe_event SET state = 'enqueue_failed' WHERE id = ANY(%(ids)s)",
                                     {"ids": [outcomes[i].event_id for i in waiting]})  # type: ignore[union-attr]
            for i in waiting:
                done = outcomes[i]
                assert isinstance(done, Ingested)
                outcomes[i] = Ingested(done.event_id, done.type, "enqueue_failed", done.account_id,
                                       coalesced=done.coalesced, enqueue_failed=True)

    def _ingest_payment_outcome(self, ex: Extracted, event: dict[str, Any], raw: str) -> Ingested:
        """A payment intent's outcome may settle the isolated bad-debt payment: recorded in the
        transaction that stores the event (app/payments/bad_debt_webhook.py)."""
        recorded = None
        with unit_of_work(self.engine) as conn:
            stored = store.ingest_events(conn, [(ex, raw)])[0]
            if stored is not None and stored.state == "accepted" and stored.account_id is not None:
                recorded = bad_debt_webhook.record_outcome(conn, ex.type, stored.account_id, ex.payment_intent, event)
        if recorded is not None:
            bad_debt_webhook.after_commit(self.celery_app, recorded)
        done = self._answer([ex], [stored])[0]
        assert isinstance(done, Ingested)
        return done


def _outcome(ex: Extracted, stored: store.Stored | BaseException | None) -> tuple[Ingested | BaseException,
                                                                                  TaskCall | None]:
    """What the request answers, and the recompute to enqueue if the event created the request."""
    if isinstance(stored, BaseException):
        return stored, None
    if stored is None:
        return Ingested(ex.event_id, ex.type, "duplicate"), None
    if stored.state != "accepted" or stored.account_id is None:
        # ignored: nothing to act on. unroutable: kept with its mirror row, visible, and re-driven
        # by beat once subs_customer maps the customer (for an event naming none: the customer of
        # the invoice or payment intent it names, once the mirror has them; app/redrive.py).
        return Ingested(ex.event_id, ex.type, stored.state), None
    if not stored.created or stored.trigger is None:
        return Ingested(ex.event_id, ex.type, stored.state, stored.account_id, coalesced=True), None
    return (Ingested(ex.event_id, ex.type, stored.state, stored.account_id, enqueued=True),
            recompute_call(stored.account_id, stored.trigger, ex.event_id))


def _infrastructure(exc: BaseException) -> bool:
    """The database slow (a statement past statement_timeout) or gone: nothing about one event."""
    return (isinstance(exc, TimedOut) and not isinstance(exc, LockNotAvailable)) or is_connection_error(exc)


def _count(outcomes: list[Ingested | BaseException]) -> None:
    """Webhooks received, by type and state: one increment per kind in a batch, not per request
    (each is a locked write to a shared file under gunicorn's multiprocess metrics)."""
    counts: dict[tuple[str, str], int] = {}
    for o in outcomes:
        if isinstance(o, Ingested):
            key = (o.type, o.state)
            counts[key] = counts.get(key, 0) + 1
    for key, n in counts.items():
        _received(key).inc(n)


@cache
def _received(key: tuple[str, str]) -> Any:
    """The counter of one (type, state): looked up once, not on every batch. The keys are bounded:
    only verified Stripe events get here, of Stripe's event types."""
    return metrics.WEBHOOKS_RECEIVED.labels(*key)


def _not_storable(item: store.Item, refused: ValueRejected) -> EventNotStorable:
    """Says which value: PostgreSQL's first line names the column or the type and the value (its
    DETAIL, the whole failing row, is left out). Stripe shows the reason in the endpoint's log."""
    reason = next(iter(str(refused).strip().splitlines()), "refused")
    reason = reason if len(reason) <= 200 else reason[:197] + "..."
    return EventNotStorable(f"event {item[0].event_id} holds a value that cannot be stored ({reason})")
