"""Re-driving work that is not on a queue: requests whose message was never queued or was lost,
events whose customer had no account when they arrived, and accounts whose decision time alone
changes now (their next review is due)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import Connection, Engine

from app.db import unit_of_work
from app.dispatch import BrokerUnavailable, recompute_call, send_many
from webhooks import store

log = logging.getLogger(__name__)

SEND_CHUNK = 500

# Routing the unroutable events. Many never route (another product's customers, whom this fleet never
# maps) and stripe_event is never pruned, so a tick does not read them all: it looks only at
# * the events of the customers subs_customer mapped since the previous tick (MAPPED: by created_at,
#   at most MAPPED_PER_TICK customers a tick, so a bulk mapping is gone through over a few ticks),
#   and of the newest MAPPED_RECHECK of those mapped in the last MAPPED_OVERLAP that the cursor had
#   passed (created_at is the inserting transaction's start: a row committed after a tick looked may
#   come in behind it); whether they name the customer or an invoice or payment intent filed under it
#   (NEWLY_MAPPED);
# * the newest unroutable events naming no customer, received in the last RECENT_WINDOW: an invoice
#   or payment intent the mirror files after the event that names it (Stripe's order) routes them
#   (RECENT);
# * the next WALK_PER_TICK of all the unroutable events, by a cursor going round (WALK): what the
#   above miss (a mapping inserted with an older created_at, a mirror row filed later than the window)
#   is routed when the walk comes by.
# The cursors (redrive_cursor) move with the routing's commit, and stay where they were when a tick
# routed ``limit`` events (the rest come next tick). The routing runs in its own transaction and a
# failure of it does not stop the stale-request and due-review re-drives of the tick (redrive()).
MAPPED_PER_TICK = 5000
MAPPED_RECHECK = 1000
MAPPED_OVERLAP = timedelta(minutes=10)
RECENT_WINDOW = timedelta(hours=1)
RECENT_PER_TICK = 1000
WALK_PER_TICK = 2000
NEG_INFINITY = datetime.min.replace(tzinfo=UTC)  # before any event

# One routing tick at a time: a second one (a tick run by hand beside beat's) skips its routing.
# The first tick (after the migration) takes the mappings from then on (and rechecks the last
# MAPPED_OVERLAP's), and walks from the first event.
START_CURSORS = """
INSERT INTO redrive_cursor (name, at, after_id)
VALUES ('mapped_customers', now(), ''), ('unroutable_walk', '0001-01-01 00:00:00+00', '')
ON CONFLICT (name) DO NOTHING
"""
LOCK_CURSORS = "SELECT name, at, after_id FROM redrive_cursor ORDER BY name FOR UPDATE SKIP LOCKED"
SAVE_CURSOR = "UPDATE redrive_cursor SET at = %(at)s, after_id = %(after_id)s WHERE name = %(name)s"

# subs_customer (another team's table) has no index on created_at: this reads it sequentially, a cost
# that grows with the customers mapped, not with the events that never route. ``next``: the page past
# the cursor, in order; the others: the recheck.
MAPPED = """
(SELECT true AS next, c.created_at, c.stripe_customer_id FROM subs_customer c
  WHERE (c.created_at, c.stripe_customer_id) > (%(at)s, %(after_id)s)
  ORDER BY c.created_at, c.stripe_customer_id LIMIT %(page)s)
UNION ALL
(SELECT false, c.created_at, c.stripe_customer_id FROM subs_customer c
  WHERE c.created_at >= %(recheck_since)s AND (c.created_at, c.stripe_customer_id) <= (%(at)s, %(after_id)s)
  ORDER BY c.created_at DESC LIMIT %(recheck)s)
"""

# The unroutable events of ``customers``: naming one, or an invoice or payment intent filed under one.
NEWLY_MAPPED = """
WITH mapped AS MATERIALIZED (SELECT unnest(%(customers)s::text[]) AS stripe_customer_id),
invoices AS MATERIALIZED (
    SELECT i.id FROM stripe_invoice i JOIN mapped m ON m.stripe_customer_id = i.stripe_customer_id),
intents AS MATERIALIZED (
    SELECT a.id FROM stripe_payment_attempt a JOIN mapped m ON m.stripe_customer_id = a.stripe_customer_id
    UNION ALL SELECT a.id FROM stripe_payment_attempt a JOIN invoices i ON a.invoice_id = i.id)
SELECT e.id FROM stripe_event e JOIN mapped m ON e.stripe_customer_id = m.stripe_customer_id
 WHERE e.state = 'unroutable'
UNION ALL SELECT e.id FROM stripe_event e JOIN invoices i ON e.route_invoice_id = i.id WHERE e.state = 'unroutable'
UNION ALL SELECT e.id FROM stripe_event e JOIN intents a ON e.route_payment_intent_id = a.id
 WHERE e.state = 'unroutable'
LIMIT %(limit)s
"""

RECENT = """
SELECT id FROM (SELECT e.id, e.stripe_customer_id FROM stripe_event e
                 WHERE e.state = 'unroutable' AND e.received_at >= %(since)s
                 ORDER BY e.received_at DESC LIMIT %(limit)s) r
 WHERE r.stripe_customer_id IS NULL
"""

WALK = """
SELECT e.received_at, e.id FROM stripe_event e
 WHERE e.state = 'unroutable' AND (e.received_at, e.id) > (%(at)s, %(after_id)s)
 ORDER BY e.received_at, e.id LIMIT %(limit)s
"""

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
# ``ids``: the candidates above; only they are read.
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
             WHERE u.id = ANY(%(ids)s) AND u.state = 'unroutable'
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


def route_unroutable(conn: Connection, limit: int) -> list[tuple[str, str, str]]:
    """Route, in the caller's transaction, what may have become routable since the previous tick (see
    "Routing the unroutable events" above): the (account, trigger, event) of each event routed, in
    account order; the cursors moved on with it."""
    conn.exec_driver_sql(START_CURSORS)
    cursors = {name: (at, after_id) for name, at, after_id in conn.exec_driver_sql(LOCK_CURSORS)}
    if len(cursors) < 2:  # another tick is routing
        return []
    now = conn.exec_driver_sql("SELECT now()").scalar_one()
    mapped_at, mapped_after = cursors["mapped_customers"]
    walk_at, walk_after = cursors["unroutable_walk"]
    customers = conn.exec_driver_sql(MAPPED, {"at": mapped_at, "after_id": mapped_after, "page": MAPPED_PER_TICK,
                                              "recheck_since": now - MAPPED_OVERLAP,
                                              "recheck": MAPPED_RECHECK}).fetchall()
    candidates: set[str] = set()
    if customers:
        candidates.update(r[0] for r in conn.exec_driver_sql(NEWLY_MAPPED, {"customers": [c[2] for c in customers],
                                                                             "limit": limit}))
    candidates.update(r[0] for r in conn.exec_driver_sql(RECENT, {"since": now - RECENT_WINDOW,
                                                                   "limit": RECENT_PER_TICK}))
    walked = conn.exec_driver_sql(WALK, {"at": walk_at, "after_id": walk_after, "limit": WALK_PER_TICK}).fetchall()
    candidates.update(r[1] for r in walked)
    routed = [(r[0], r[1], r[2]) for r in
              conn.exec_driver_sql(ROUTE_UNROUTABLE, {"ids": sorted(candidates), "limit": limit}).fetchall()]
    if len(routed) < limit:  # else the cursors stay: the rest is routed by the next ticks
        page = [c for c in customers if c[0]]
        if page:
            conn.exec_driver_sql(SAVE_CURSOR, {"name": "mapped_customers", "at": page[-1][1], "after_id": page[-1][2]})
        # Round again from the first event once the walk has come to the last.
        last = walked[-1] if len(walked) == WALK_PER_TICK else (NEG_INFINITY, "")
        conn.exec_driver_sql(SAVE_CURSOR, {"name": "unroutable_walk", "at": last[0], "after_id": last[1]})
    return routed


def redrive(engine: Engine, celery_app: Celery, stale_after_seconds: int = 60, limit: int = 5000,
            now: datetime | None = None) -> dict[str, int]:
    """Route the unroutable events that may route now, then request the due reviews and send the stale
    requests again. The routing fails alone: its error is raised once the rest of the tick is done
    (the tick is then a stuck row, as any beat task's failure), so it never holds the others up."""
    routed = reviewed = 0
    to_send: list[tuple[str, str, str | None]] = []
    routed_events: dict[str, list[str]] = {}  # the events routed, by account
    routing_error: Exception | None = None
    try:
        with unit_of_work(engine) as conn:
            first: dict[str, tuple[str, str]] = {}  # per account, in account order: its first event, as ingest does
            for account_id, trigger, event_id in route_unroutable(conn, limit):
                routed += 1
                first.setdefault(account_id, (trigger or "STATE_REFRESH", event_id))
                routed_events.setdefault(account_id, []).append(event_id)
            for account_id, (trigger, event_id) in first.items():  # one request each
                if store.request_recompute(conn, account_id, trigger, event_id):
                    to_send.append((account_id, trigger, event_id))
    except SoftTimeLimitExceeded:
        raise  # the task's time is up, not the routing's failure: the hard limit comes next
    except Exception as exc:  # rolled back whole: its events stay unroutable, its cursors where they were
        log.warning("redrive could not route the unroutable events: %s", exc)
        routing_error = exc
        routed, to_send, routed_events = 0, [], {}
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
    if routing_error is not None:
        raise routing_error
    return {"routed": routed, "reviewed": reviewed, "sent": len(sent), "failed": failed}
