"""Re-driving work that is not on a queue: requests whose message was never queued or was lost,
events whose customer had no account when they arrived, and accounts whose decision time alone
changes now (their next review is due)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from celery import Celery
from sqlalchemy import Engine

from app.db import unit_of_work
from app.dispatch import BrokerUnavailable, recompute_call, send_many
from webhooks import store

log = logging.getLogger(__name__)

SEND_CHUNK = 500

# At most ``limit`` events a tick (any of those a mapping routes now; the others are routed by the
# next ticks): a bulk mapping by another team must not make one tick as long as its backlog, holding
# every routed account's request row until it commits and running past the task's time limit, to be
# rolled back and tried the same way on every tick before the stale requests and due reviews.
# SKIP LOCKED: an event another tick is routing is that tick's.
# The accounts come back in their order (the database's collation), as every query here returns
# them: their request rows are then locked in the order webhook ingest locks them in (its statement
# takes a batch's in account order), so a re-drive and a batch of webhooks cannot deadlock.
# An event is routed by its customer, as at ingest; one that names none (invoice_payment.paid names
# its invoice, a dispute its payment intent) by the customer of what ingest looked it up by
# (stripe_event.route_*: kept for the events it stored unroutable), once the mirror has it: the
# invoice's row, the intent's attempt, else the invoice that attempt is linked to (an attempt known
# only through invoice_payment.paid names no customer). Their mirror rows were written at ingest
# under the ordering guard (the event was neither refused nor ignored); routing requests the
# recompute that reads them. The event then names the customer it was routed by.
ROUTE_UNROUTABLE = """
WITH routed AS (
    UPDATE stripe_event e SET account_id = p.account_id, state = 'accepted',
                              stripe_customer_id = p.stripe_customer_id
      FROM (SELECT u.id, c.stripe_customer_id, c.account_id FROM stripe_event u
              JOIN subs_customer c ON c.stripe_customer_id = COALESCE(
                   u.stripe_customer_id,
                   (SELECT i.stripe_customer_id FROM stripe_invoice i WHERE i.id = u.route_invoice_id),
                   (SELECT a.stripe_customer_id FROM stripe_payment_attempt a WHERE a.id = u.route_payment_intent_id),
                   (SELECT i.stripe_customer_id FROM stripe_payment_attempt a
                      JOIN stripe_invoice i ON i.id = a.invoice_id WHERE a.id = u.route_payment_intent_id))
             WHERE u.state = 'unroutable'
             LIMIT %(limit)s FOR UPDATE OF u SKIP LOCKED) p
     WHERE e.id = p.id
    RETURNING e.account_id, e.trigger, e.id
)
SELECT account_id, trigger, id FROM routed ORDER BY account_id, id
"""

# SKIP LOCKED: a request that ingest is updating right now is fresh, not stale.
# Except a request parked by its account's recompute given up as dead (tasks.failures.PARK_REQUEST)
# and not touched since (parked_touch = touched_at): sending it every minute would only fail the same
# way; the dead row is for an operator, whose re-drive recomputes (taking the request). Anything that
# asks for it anew (a webhook, a due review, a refused retry) touches it and it is sent again; a run
# given up as dead parks only the version it took, never one touched while it ran.
STALE_REQUESTS = """
UPDATE recompute_request r SET requested_at = now()
 WHERE r.account_id IN (SELECT q.account_id FROM recompute_request q
                         WHERE q.requested_at < now() - make_interval(secs => %(age)s)
                           AND (q.parked_touch IS DISTINCT FROM q.touched_at
                                OR NOT EXISTS (SELECT 1 FROM subs_stuck_events s
                                                WHERE s.account_id = q.account_id
                                                  AND s.task_name = 'tasks.recompute_account'
                                                  AND s.state = 'dead'))
                         ORDER BY q.requested_at LIMIT %(limit)s FOR UPDATE OF q SKIP LOCKED)
RETURNING r.account_id, r.trigger, r.cause
"""


# Accounts whose decision time alone changes now (subs_dunning.next_review_at, set by compute):
# no event may come (a permanent decline has no retries), so nothing else would recompute them.
# Except one whose recompute has failed for good (a dead stuck row) since its review came due: its
# review stays due, as nothing stored the next one, and requesting it again every tick would only
# fail the same way. Its dead row is for an operator; a recompute that succeeds later (a webhook, a
# re-drive) stores a new review time, and that one is requested when it comes.
DUE_REVIEWS = """
SELECT account_id FROM (
    SELECT d.account_id FROM subs_dunning d
     WHERE d.next_review_at <= %(now)s
       AND NOT EXISTS (SELECT 1 FROM subs_stuck_events s
                        WHERE s.account_id = d.account_id AND s.task_name = 'tasks.recompute_account'
                          AND s.state = 'dead' AND s.last_failed_at >= d.next_review_at)
     ORDER BY d.next_review_at LIMIT %(limit)s
) due ORDER BY account_id
"""


# Events whose recompute the broker did not take at ingest (enqueue_failed) that no longer wait for
# one: their account's request is queued now (``ids``: only the accounts whose send succeeded, the
# others' events still wait), or it is gone: a run took it (the support button, a retry, a re-driven
# stuck recompute) before any re-drive queued it, and every run that takes a request an event created
# or touched gathers after that event committed. A pending request that a run is taking right now is
# still seen (its delete is not committed). Few rows: the partial index on the state.
NO_LONGER_WAITING = """
UPDATE stripe_event e SET state = 'accepted'
 WHERE e.state = 'enqueue_failed'
   AND (e.account_id = ANY(%(ids)s)
        OR NOT EXISTS (SELECT 1 FROM recompute_request q WHERE q.account_id = e.account_id))
"""


NOT_QUEUED = "UPDATE stripe_event SET state = 'enqueue_failed' WHERE id = ANY(%(ids)s) AND state = 'accepted'"


def redrive(engine: Engine, celery_app: Celery, stale_after_seconds: int = 60, limit: int = 5000,
            now: datetime | None = None) -> dict[str, int]:
    routed = reviewed = 0
    to_send: list[tuple[str, str, str | None]] = []
    routed_events: dict[str, list[str]] = {}  # the events routed, by account
    with unit_of_work(engine) as conn:
        first: dict[str, tuple[str, str]] = {}  # per account, in account order: its first event, as ingest does
        for account_id, trigger, event_id in conn.exec_driver_sql(ROUTE_UNROUTABLE, {"limit": limit}).fetchall():
            routed += 1
            first.setdefault(account_id, (trigger or "STATE_REFRESH", event_id))
            routed_events.setdefault(account_id, []).append(event_id)
        for account_id, (trigger, event_id) in first.items():  # one request each
            if store.request_recompute(conn, account_id, trigger, event_id):
                to_send.append((account_id, trigger, event_id))
    requested = {account_id for account_id, _, _ in to_send}  # the requests routing created
    with unit_of_work(engine) as conn:
        # A request each, as for an event: coalesced with one already pending, re-driven if lost.
        due = conn.exec_driver_sql(DUE_REVIEWS, {"limit": limit, "now": now or datetime.now(UTC)}).fetchall()
        for (account_id,) in due:
            reviewed += 1
            if store.request_recompute(conn, account_id, "STATE_REFRESH", "review_due"):
                to_send.append((account_id, "STATE_REFRESH", "review_due"))
    with unit_of_work(engine) as conn:
        rows = conn.exec_driver_sql(STALE_REQUESTS, {"age": stale_after_seconds, "limit": limit}).fetchall()
        to_send.extend((r[0], r[1], r[2]) for r in rows)
    sent: list[str] = []
    failed = 0
    for start in range(0, len(to_send), SEND_CHUNK):  # a chunk per broker round trip
        chunk = to_send[start:start + SEND_CHUNK]
        try:
            send_many(celery_app, [recompute_call(account_id, trigger, cause) for account_id, trigger, cause in chunk])
            sent.extend(account_id for account_id, _, _ in chunk)
        except BrokerUnavailable as exc:
            failed += len(chunk)
            log.warning("redrive could not queue %d recomputes: %s", len(chunk), exc)
    # The routed events whose request this created and the broker did not take wait for the stale
    # re-drive, as an event ingest could not enqueue does (not "accepted": nothing is queued yet).
    unsent = [e for account_id in sorted(requested - set(sent)) for e in routed_events[account_id]]
    with unit_of_work(engine) as conn:
        if unsent:
            conn.exec_driver_sql(NOT_QUEUED, {"ids": unsent})
        conn.exec_driver_sql(NO_LONGER_WAITING, {"ids": sent})
    return {"routed": routed, "reviewed": reviewed, "sent": len(sent), "failed": failed}
