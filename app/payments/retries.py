"""Dispatch of due payment retries (beat, at least once a minute).

Compute stores the next retry as a row fact (``subs_dunning.next_retry_at``); nothing waits in a
Celery countdown. Dispatch claims each due retry by inserting a ``payment_retry`` row whose
idempotency key names the attempt, so a second dispatcher hits the unique key and sends nothing,
and the next beat tick, before the account is recomputed, passes over an attempt already made.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Engine

from app.db import unit_of_work
from app.domain.triggers import Trigger
from webhooks.store import request_recompute

log = logging.getLogger(__name__)

# Until the account is recomputed after an attempt, its decision still says "due" under that
# attempt's key, which CLAIM_SQL never takes again unless the row was skipped. Such accounts are
# passed over (matched on what the key is made of, see idempotency_key): at the head of the query
# they would take the limited slots from later retries every tick (a recompute backlog, a lost
# recompute message). A decision whose invoice another account owns now (another team moved its
# customer; the account's recompute is on its way, app/sweep/refile.py) is passed over too: the
# invoice's retries are the owner's to plan, and a stale plan must not charge it. So is one whose
# invoice a bad-debt payment in flight covers: the account's own is held by compute already, but
# one the old account made before the move is not the owner's to see, and both would collect the
# invoice. Once that payment has ended, the decision, still due, is dispatched.
#
# Nor is a decision claimed while a recompute of its account is pending (a webhook stored since the
# decision, not yet recomputed: a recompute backlog, the account's lock held): the mirror holds what it
# did not know, and the claim records the mirror's latest attempt and default-card change as the ones
# the decision saw (CLAIM_SQL), so the worker's checks would let through the customer's hosted-page
# decline or Stripe's own retry of seconds ago, and charge the card again right after it. A skipped row
# (the worker found such an attempt after the claim) is re-armed from the stale decision the same way at
# the next tick otherwise. The recompute that takes the request replans (spacing its retry after that
# charge), and the decision is claimed then if still due. A parked request (its recompute given up as
# dead: tasks/failures.py PARK_REQUEST) holds nothing.
DUE_SQL = """
SELECT d.account_id, d.retry_invoice_id, d.retry_payment_method_id, d.retry_free, d.next_retry_at
  FROM subs_dunning d
 WHERE d.next_retry_at <= %(now)s AND d.retry_invoice_id IS NOT NULL
   AND EXISTS (SELECT 1 FROM stripe_invoice i JOIN subs_customer c USING (stripe_customer_id)
                WHERE i.id = d.retry_invoice_id AND c.account_id = d.account_id)
   AND NOT EXISTS (SELECT 1 FROM bad_debt_payment b
                    WHERE b.state = 'pending' AND b.invoice_ids @> jsonb_build_array(d.retry_invoice_id))
   AND NOT EXISTS (SELECT 1 FROM payment_retry r
                    WHERE r.invoice_id = d.retry_invoice_id AND r.scheduled_for = d.next_retry_at
                      AND r.free = d.retry_free
                      AND (NOT r.free OR r.payment_method_id IS NOT DISTINCT FROM d.retry_payment_method_id)
                      AND r.state <> 'skipped')
   AND NOT EXISTS (SELECT 1 FROM recompute_request q
                    WHERE q.account_id = d.account_id AND q.parked_touch IS DISTINCT FROM q.touched_at)
 ORDER BY d.next_retry_at
 LIMIT %(limit)s
"""

# Mirrors Retry.counts in the domain: a skipped or refused retry never charged, a free one is not
# budgeted.
USED_SQL = """
SELECT count(*) FROM payment_retry
 WHERE invoice_id = %(invoice)s AND NOT free AND state NOT IN ('skipped', 'refused')
"""

# A skipped row was never charged: when the decision still asks for that very attempt (e.g. it
# was skipped as stale after a queue backlog), dispatch re-arms it under the same key, for the
# account whose decision asks now: the key names the invoice, and its customer may have moved to
# another account (the row kept under the old one would be checked against the old account's
# decision, which no longer plans it, and skipped at every tick).
#
# The claim records what the mirror holds of Stripe's side, by Stripe's clock: the invoice's latest
# attempt (linked to it, or to no invoice yet: since API 2025-03-31 a charge or intent names no invoice,
# so the invoice's own intent, declined again on the hosted page or by Stripe's own retry, is linked only
# once paid, if ever; any unlinked attempt of the invoice's customer counts) and its customer's latest
# default-card change. The worker stops the charge when the mirror
# holds a later one (app/payments/pay.py ROW_SQL): compared with the claim's own time (beat's clock),
# a payment or card change Stripe made just after the claim looked older on a beat host ahead of Stripe.
# And the claimed card's latest change: a retry claimed knowing of it tried the card after it
# (app/domain/retry_cadence.py _tried_since), whichever way beat's clock is off Stripe's.
CLAIM_SQL = """
INSERT INTO payment_retry (account_id, invoice_id, payment_method_id, retry_number, free, idempotency_key,
                           scheduled_for, state, created_at, updated_at, attempts_seen_until,
                           default_change_seen_at, method_change_seen_at)
VALUES (%(account)s, %(invoice)s, %(method)s, %(number)s, %(free)s, %(key)s, %(scheduled)s, 'dispatched',
        %(now)s, %(now)s,
        (SELECT max(a.attempted_at) FROM stripe_payment_attempt a
          WHERE a.invoice_id = %(invoice)s
             OR (a.invoice_id IS NULL AND a.stripe_customer_id = (SELECT i.stripe_customer_id FROM stripe_invoice i
                                                                   WHERE i.id = %(invoice)s))),
        (SELECT s.changed_at FROM stripe_invoice i JOIN stripe_customer_state s USING (stripe_customer_id)
          WHERE i.id = %(invoice)s),
        (SELECT m.changed_at FROM stripe_payment_method m WHERE m.id = %(method)s))
ON CONFLICT (idempotency_key) DO UPDATE
   SET state = 'dispatched', error = NULL, account_id = EXCLUDED.account_id, scheduled_for = EXCLUDED.scheduled_for,
       payment_method_id = EXCLUDED.payment_method_id, created_at = EXCLUDED.created_at,
       updated_at = EXCLUDED.updated_at, attempts_seen_until = EXCLUDED.attempts_seen_until,
       default_change_seen_at = EXCLUDED.default_change_seen_at, method_change_seen_at = EXCLUDED.method_change_seen_at
 WHERE payment_retry.state = 'skipped'
RETURNING id
"""

# Rows claimed but whose message may never have reached the broker (it was down): send again.
# A duplicate message is harmless: retry_payment charges a row once.
UNSENT_SQL = """
UPDATE payment_retry SET updated_at = %(now)s
 WHERE id IN (SELECT id FROM payment_retry
               WHERE state = 'dispatched' AND updated_at < %(now)s - make_interval(secs => %(stale)s)
                 AND created_at > %(now)s - make_interval(mins => %(guard)s)
               ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
RETURNING id
"""


# Rows claimed longer ago than the guard window and still never sent (the broker down, a message
# lost): they never reached Stripe (a row that does is charging first), and retry_payment would now
# skip them as no longer due. They become skipped, so that they stop counting as an attempt in flight
# or as a used retry, and their accounts are recomputed: compute plans afresh (the same attempt is
# re-armed under its key if the decision still asks for it). Candidates are read first and their
# accounts' requests written before the retry rows are locked, the order in which webhook ingest and
# a refused retry lock them.
UNSENT_TOO_LONG_SQL = """
SELECT DISTINCT account_id FROM payment_retry
 WHERE state = 'dispatched' AND created_at <= %(now)s - make_interval(mins => %(guard)s)
 ORDER BY account_id LIMIT %(limit)s
"""
EXPIRE_SQL = """
UPDATE payment_retry SET state = 'skipped', updated_at = %(now)s,
       error = 'never sent within the guard window; compute plans afresh'
 WHERE id IN (SELECT id FROM payment_retry
               WHERE account_id = ANY(%(accounts)s) AND state = 'dispatched'
                 AND created_at <= %(now)s - make_interval(mins => %(guard)s)
               FOR UPDATE SKIP LOCKED)
   AND state = 'dispatched'
"""


@dataclass(frozen=True)
class DueRetry:
    account_id: str
    invoice_id: str
    payment_method_id: str | None
    free: bool
    due_at: datetime


def idempotency_key(due: DueRetry) -> str:
    """One key per attempt, taken from the stored decision and not from the rows: until the account
    is recomputed the decision keeps saying "due", and the next tick must find the same key. The
    due time names the attempt (day N of the schedule after the first failure; for a free retry,
    the payment-method change); a recompute after the attempt plans another time."""
    epoch = int(due.due_at.timestamp())
    if due.free:
        return f"free:{due.invoice_id}:{due.payment_method_id}:{epoch}"
    return f"retry:{due.invoice_id}:{epoch}"


def due_retries(conn: Connection, now: datetime, limit: int) -> list[DueRetry]:
    rows = conn.exec_driver_sql(DUE_SQL, {"now": now, "limit": limit}).fetchall()
    return [DueRetry(r[0], r[1], r[2], bool(r[3]), r[4]) for r in rows]


def claim(conn: Connection, due: DueRetry, now: datetime) -> int | None:
    """The new payment_retry id, or None when this attempt was already claimed."""
    used = int(conn.exec_driver_sql(USED_SQL, {"invoice": due.invoice_id}).scalar_one())
    number = used + 1
    row = conn.exec_driver_sql(CLAIM_SQL, {
        "account": due.account_id, "invoice": due.invoice_id, "method": due.payment_method_id,
        "number": number, "free": due.free, "key": idempotency_key(due), "scheduled": due.due_at,
        "now": now,
    }).first()
    return int(row[0]) if row else None


def claim_due(engine: Engine, now: datetime, limit: int = 500, guard_minutes: int = 30,
              unsent_after_seconds: int = 120) -> list[int]:
    """Claim every due retry and pick up claimed rows that were never sent; -> ids to send."""
    ids: list[int] = []
    with unit_of_work(engine) as conn:
        for due in due_retries(conn, now, limit):
            retry_id = claim(conn, due, now)
            if retry_id is not None:
                ids.append(retry_id)
        unsent = conn.exec_driver_sql(UNSENT_SQL, {"now": now, "stale": unsent_after_seconds,
                                                   "guard": guard_minutes, "limit": limit}).fetchall()
        ids.extend(int(r[0]) for r in unsent if int(r[0]) not in ids)
    return ids


def expire_unsent(engine: Engine, now: datetime, guard_minutes: int = 30, limit: int = 500) -> list[str]:
    """Skip the claimed retries that were never sent within the guard window (UNSENT_TOO_LONG_SQL);
    -> the accounts whose recompute this requested (the caller enqueues them after the commit)."""
    with unit_of_work(engine) as conn:
        accounts = [str(r[0]) for r in conn.exec_driver_sql(
            UNSENT_TOO_LONG_SQL, {"now": now, "guard": guard_minutes, "limit": limit}).fetchall()]
        if not accounts:
            return []
        # In the database's order of account ids (its collation, not Python's): the order webhook
        # ingest locks request rows in, so the two cannot deadlock.
        requested = [a for a in accounts
                     if request_recompute(conn, a, Trigger.STATE_REFRESH.value, "retry:never_sent")]
        conn.exec_driver_sql(EXPIRE_SQL, {"now": now, "guard": guard_minutes, "accounts": accounts})
    log.warning("%d accounts had a claimed retry never sent within %d minutes; recomputing them",
                    len(accounts), guard_minutes)
    return requested
