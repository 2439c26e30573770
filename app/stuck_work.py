"""Stuck work (subs_stuck_events): listing it for operators and re-driving it.

A task that gives up is recorded by tasks.failures.record_stuck as ``retrying`` (it keeps
retrying, and beat re-drives it when its own retries are over) or ``dead`` (invalid data or a
permanent API error: an operator looks, fixes, and re-drives it by hand). A re-driven task carries
the row's id in its task id; when it succeeds the row becomes ``resolved``.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import Celery
from sqlalchemy import Connection, Engine

from app import metrics
from app.db import unit_of_work
from app.dispatch import BrokerUnavailable, send
from app.support import audit
from tasks.failures import PASSING

log = logging.getLogger(__name__)

STATES = ("retrying", "dead", "resolved")
TASK_ID_PREFIX = "redrive-stuck-"
REDRIVE_EVERY_SECONDS = 300
# A task whose result has this key true ran but passed its work on to a later run (sent with the
# same stuck-row id in its task id): its success does not resolve the row.
DEFERRED = "deferred"

# By the database's clock, which set next_redrive_at (record_stuck, ONE_SQL: now() + 5 minutes): the
# clock of the host beat's tick runs on may be off it, and a host minutes ahead re-drove a row as
# soon as it was written, while its task was still retrying itself.
DUE_SQL = """
UPDATE subs_stuck_events SET next_redrive_at = now() + make_interval(secs => %(every)s)
 WHERE id IN (SELECT id FROM subs_stuck_events
               WHERE state = 'retrying' AND next_redrive_at <= now()
               ORDER BY next_redrive_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
RETURNING id, task_name, task_args
"""

ONE_SQL = """
UPDATE subs_stuck_events SET state = 'retrying', next_redrive_at = now() + make_interval(secs => %(every)s)
 WHERE id = %(id)s AND state <> 'resolved'
RETURNING id, task_name, task_args
"""

LIST_SQL = """
SELECT id, account_id, stripe_event_id, task_name, task_args, error_class, error, attempts, state,
       first_failed_at, last_failed_at, next_redrive_at, resolved_at
  FROM subs_stuck_events
 WHERE (%(state)s::text IS NULL OR state = %(state)s) AND (%(account)s::text IS NULL OR account_id = %(account)s)
 ORDER BY last_failed_at DESC, id DESC
 LIMIT %(limit)s
"""

COUNTS_SQL = "SELECT state, count(*) FROM subs_stuck_events GROUP BY state"


def task_id_for(stuck_id: int) -> str:
    return f"{TASK_ID_PREFIX}{stuck_id}-{uuid.uuid4().hex[:12]}"


def stuck_id_of(task_id: str | None) -> int | None:
    if not task_id or not task_id.startswith(TASK_ID_PREFIX):
        return None
    head = task_id[len(TASK_ID_PREFIX):].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _send(celery_app: Celery, stuck_id: int, task_name: str, task_args: dict[str, Any]) -> bool:
    try:
        send(celery_app, task_name, [], dict(task_args or {}), task_id=task_id_for(stuck_id), ignore_result=True)
        return True
    except BrokerUnavailable as exc:
        log.warning("could not re-drive stuck work %s (%s): %s", stuck_id, task_name, exc)
        return False


def redrive_due(engine: Engine, celery_app: Celery, limit: int = 200) -> dict[str, int]:
    """Send again the retrying rows whose re-drive time came, by the database's clock (DUE_SQL)."""
    with unit_of_work(engine) as conn:
        rows = conn.exec_driver_sql(DUE_SQL, {"every": REDRIVE_EVERY_SECONDS, "limit": limit}).fetchall()
    sent = sum(1 for r in rows if _send(celery_app, int(r[0]), r[1], r[2]))
    return {"due": len(rows), "sent": sent}


BEFORE_SQL = "SELECT account_id, state FROM subs_stuck_events WHERE id = %(id)s FOR UPDATE"


def redrive_one(engine: Engine, celery_app: Celery, stuck_id: int, actor: str | None = None) -> str | None:
    """Re-drive one row now (dead ones too, after an operator fixed the cause) -> the task id.
    ``actor``: who asked (the authenticated principal), audited (stuck.redrive) in the transaction
    that sets the row retrying, before the task is sent."""
    task_id = task_id_for(stuck_id)
    with unit_of_work(engine) as conn:
        before = conn.exec_driver_sql(BEFORE_SQL, {"id": stuck_id}).first() if actor is not None else None
        row = conn.exec_driver_sql(ONE_SQL, {"id": stuck_id, "every": REDRIVE_EVERY_SECONDS}).first()
        audit_id = 0
        if row is not None and before is not None and actor is not None:
            audit_id = audit.record(conn, actor, "stuck.redrive", before[0], {
                "stuck_id": stuck_id, "task_name": row[1], "state_before": before[1], "task_id": task_id})
    if row is None:
        return None
    try:
        send(celery_app, row[1], [], dict(row[2] or {}), task_id=task_id, ignore_result=True)
    except BrokerUnavailable:
        if audit_id:  # the row is retrying: beat sends it later, under a task id of its own
            with unit_of_work(engine) as conn:
                audit.add_detail(conn, audit_id, {"queued": False})
        raise
    return task_id


def mark_resolved(engine: Engine, stuck_id: int) -> None:
    with unit_of_work(engine) as conn:
        conn.exec_driver_sql("UPDATE subs_stuck_events SET state = 'resolved', resolved_at = now(), "
                             "next_redrive_at = NULL WHERE id = %(id)s AND state <> 'resolved'", {"id": stuck_id})


# A beat task's row (no account, no arguments): the task's next tick does the same work whole.
RESOLVE_BEAT_SQL = """
UPDATE subs_stuck_events SET state = 'resolved', resolved_at = now(), next_redrive_at = NULL
 WHERE account_id IS NULL AND task_name = %(task)s AND task_args = '{}'::jsonb AND state <> 'resolved'
"""


def resolve_beat_task(engine: Engine, task_name: str) -> None:
    """A task run without arguments (a beat tick) succeeded: its stuck rows, dead or retrying, are
    resolved. Indexed on account_id (IS NULL): cheap on every tick."""
    with unit_of_work(engine) as conn:
        conn.exec_driver_sql(RESOLVE_BEAT_SQL, {"task": task_name})


# The stuck rows of a task that works on one account, for these accounts: a later run of the task's
# work for the account did it whole. Indexed on account_id.
RESOLVE_ACCOUNTS_SQL = """
UPDATE subs_stuck_events SET state = 'resolved', resolved_at = now(), next_redrive_at = NULL
 WHERE task_name = %(task)s AND account_id = ANY(%(accounts)s) AND state <> 'resolved'
   AND (NOT %(retrying_only)s OR (state = 'retrying' AND error_class = ANY(%(passing)s)))
"""


def resolve_account_task(engine: Engine, task_name: str, account_ids: list[str], retrying_only: bool = False) -> None:
    """``task_name``'s stuck rows (dead or retrying, whatever their arguments; ``retrying_only``: the
    retrying ones given up on a failure that passes, by their class: an operator's re-drive makes a
    dead row retrying, and a retrying row may be an unexpected error still within its retries) of
    these accounts are resolved: their work was done since by another run. A failure to write it is
    logged, not raised (the work is done; the next run resolves them)."""
    if not account_ids:
        return
    try:
        with unit_of_work(engine) as conn:
            conn.exec_driver_sql(RESOLVE_ACCOUNTS_SQL, {"task": task_name, "accounts": sorted(set(account_ids)),
                                                        "retrying_only": retrying_only,
                                                        "passing": sorted(kind.value for kind in PASSING)})
    except Exception:
        log.warning("could not resolve the stuck rows of %s for %d account(s)", task_name, len(account_ids),
                    exc_info=True)


def counts(conn: Connection) -> dict[str, int]:
    found = {state: int(n) for state, n in conn.exec_driver_sql(COUNTS_SQL)}
    out = {state: found.get(state, 0) for state in STATES}
    for state, n in out.items():
        metrics.STUCK_EVENTS.labels(state=state).set(n)
    return out


def list_stuck(conn: Connection, state: str | None, account_id: str | None, limit: int) -> list[dict[str, Any]]:
    rows = conn.exec_driver_sql(LIST_SQL, {"state": state, "account": account_id, "limit": limit}).fetchall()
    keys = ("id", "account_id", "stripe_event_id", "task_name", "task_args", "error_class", "error", "attempts",
            "state", "first_failed_at", "last_failed_at", "next_redrive_at", "resolved_at")
    out = []
    for r in rows:
        item = dict(zip(keys, r, strict=True))
        for k in ("first_failed_at", "last_failed_at", "next_redrive_at", "resolved_at"):
            item[k] = item[k].isoformat() if item[k] is not None else None
        out.append(item)
    return out
