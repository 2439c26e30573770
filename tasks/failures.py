"""Task failure policies by failure class (DESIGN section 8).

Each class has its own backoff; invalid data never retries. Countdowns stay far below the broker's
visibility timeout (a longer one would be redelivered again and again by Redis). A task that
gives up is written to subs_stuck_events, never dropped.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import psycopg2
from psycopg2.extras import Json
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app import metrics
from app.db import Conflict, is_connection_error, unit_of_work, without_quoted_value

log = logging.getLogger(__name__)

MAX_COUNTDOWN = 60  # seconds; far below the 300 s default visibility timeout


RETRY_AFTER_SPREAD = 1.2  # a Retry-After of n seconds retries between n and 1.2 n


class FailureKind(StrEnum):
    DATABASE_UNAVAILABLE = "database_unavailable"
    LOCK_CONTENTION = "lock_contention"
    BROKER_UNAVAILABLE = "broker_unavailable"
    REMOTE_UNAVAILABLE = "remote_unavailable"  # Account Management 5xx / timeouts, Stripe connection
    RATE_LIMITED = "rate_limited"
    INVALID_DATA = "invalid_data"
    PERMANENT_API_ERROR = "permanent_api_error"
    # A remote side refused our credentials (Stripe's 401/403: a key rolled, revoked, lacking a
    # permission). It passes once an operator configures a working key (read at the worker's start),
    # never by retrying within the run: beat re-drives the row, one call each time.
    CREDENTIALS_REFUSED = "credentials_refused"
    UNEXPECTED = "unexpected"
    KILLED = "killed"  # the task's process died under it, or was killed at the hard time limit (tasks/killed.py)


@dataclass(frozen=True)
class FailurePolicy:
    retry: bool
    max_retries: int
    base: float  # seconds
    cap: float = MAX_COUNTDOWN

    def countdown(self, retries: int, hint: float | None = None) -> float:
        if hint is not None:
            # Retry-After from the remote side wins, within the cap: never sooner than it asks, and
            # up to a fifth later, so that the tasks one rate limit refused together (a beat pass's
            # retries, a burst of bad-debt payments) do not all come back in the same second.
            wait = max(hint, 1.0)
            return min(random.uniform(wait, wait * RETRY_AFTER_SPREAD), self.cap)
        # Exponential backoff with jitter, the first retry included: tasks that failed together (a
        # database failover) must not all come back at the same moment.
        return min(self.cap, random.uniform(self.base, self.base * (2 ** (retries + 1))))


POLICIES: dict[FailureKind, FailurePolicy] = {
    FailureKind.DATABASE_UNAVAILABLE: FailurePolicy(True, 10, 2.0),
    FailureKind.LOCK_CONTENTION: FailurePolicy(True, 8, 0.2, cap=5.0),
    FailureKind.BROKER_UNAVAILABLE: FailurePolicy(True, 10, 2.0),
    FailureKind.REMOTE_UNAVAILABLE: FailurePolicy(True, 8, 2.0),
    FailureKind.RATE_LIMITED: FailurePolicy(True, 8, 2.0),
    FailureKind.INVALID_DATA: FailurePolicy(False, 0, 0),
    FailureKind.PERMANENT_API_ERROR: FailurePolicy(False, 0, 0),
    FailureKind.CREDENTIALS_REFUSED: FailurePolicy(False, 0, 2.0),  # (its base is never used: no retry)
    FailureKind.UNEXPECTED: FailurePolicy(True, 3, 5.0),
    # Never raised inside a task: Celery retries a lost child's task itself (tasks/factory.py).
    FailureKind.KILLED: FailurePolicy(False, 0, 0),
}


# Failures that pass with time (an outage, contention, a remote side down or limiting us): a task
# that has used its own retries on one is left for beat to re-drive. Any other give-up (invalid data,
# a refused API call, an unexpected error: a bug) waits for an operator.
PASSING: frozenset[FailureKind] = frozenset({
    FailureKind.DATABASE_UNAVAILABLE, FailureKind.LOCK_CONTENTION, FailureKind.BROKER_UNAVAILABLE,
    FailureKind.REMOTE_UNAVAILABLE, FailureKind.RATE_LIMITED, FailureKind.CREDENTIALS_REFUSED,
})


# Failures of our own infrastructure (the database, the broker, lock contention): they pass with
# time and say nothing about the work that met them. A drift sweep's segment is sent again on them
# (app/sweep/sweep.py RETRIED), and a remediation's recompute re-driven after one is still on its way
# for a while (app/recompute/gather_batch.py REDRIVE_GRACE), not a remediation that failed.
INFRASTRUCTURE: frozenset[FailureKind] = frozenset({
    FailureKind.DATABASE_UNAVAILABLE, FailureKind.LOCK_CONTENTION, FailureKind.BROKER_UNAVAILABLE,
})


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """The seconds a remote side's ``Retry-After`` header asks for; None when absent, or not a
    number of seconds (an HTTP date, garbage, NaN)."""
    for name, value in (headers or {}).items():
        if name.lower() == "retry-after":
            try:
                seconds = float(value)
            except (TypeError, ValueError):
                return None
            return seconds if math.isfinite(seconds) else None
    return None


class TaskFailure(Exception):
    """Raised by task code to name its failure class explicitly (with an optional Retry-After)."""

    def __init__(self, kind: FailureKind, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


def classify(exc: BaseException) -> FailureKind:
    if isinstance(exc, TaskFailure):
        return exc.kind
    from app.dispatch import BrokerUnavailable
    from app.recompute.service import AccountNotFound

    # app.dispatch's name for every failure to publish (redis-py's, kombu's): the broker's outage as
    # each caller of send meets it. Unexpected, it was retried as a bug would be, then dead.
    if isinstance(exc, BrokerUnavailable):
        return FailureKind.BROKER_UNAVAILABLE

    # Our own names for database failures (raised by the hot paths that use the driver directly):
    # before ValueError, which ValueRejected is.
    if is_connection_error(exc):
        return FailureKind.DATABASE_UNAVAILABLE
    if isinstance(exc, PoolTimeout):  # no connection of the pool free in time (app.db POOL_TIMEOUT): it passes
        return FailureKind.DATABASE_UNAVAILABLE
    if isinstance(exc, Conflict):
        return FailureKind.LOCK_CONTENTION
    if isinstance(exc, AccountNotFound | ValueError | KeyError | TypeError):
        return FailureKind.INVALID_DATA
    # SQLAlchemy's wrapped errors, and the driver's own where a hot path used its cursor directly.
    if isinstance(exc, DBAPIError | psycopg2.Error):
        if _driver_connection_lost(exc.orig if isinstance(exc, DBAPIError) else exc):
            return FailureKind.DATABASE_UNAVAILABLE
        code = getattr(exc.orig if isinstance(exc, DBAPIError) else exc, "pgcode", None)
        # 55P03 lock_not_available, 57014 query_canceled (lock/statement timeout), 40P01 deadlock,
        # 40001 serialization failure
        if code in ("55P03", "57014", "40P01", "40001"):
            return FailureKind.LOCK_CONTENTION
        return FailureKind.INVALID_DATA if code and code.startswith(("22", "23")) else FailureKind.UNEXPECTED
    from kombu.exceptions import OperationalError as KombuOperationalError

    if isinstance(exc, KombuOperationalError | ConnectionError):
        return FailureKind.BROKER_UNAVAILABLE
    return FailureKind.UNEXPECTED


def describe(exc: BaseException) -> str:
    """The error as a stuck row shows it (to ops and on the support page): its type and message; for
    a database error its SQLSTATE, PostgreSQL's primary message and the statement, never the values
    the statement carried. SQLAlchemy's text adds ``[parameters: ...]``; the driver's quotes the
    statement with its values inlined (``LINE 1: ...``) and the row in its ``DETAIL`` (a unique
    key, a failing row); a data exception's message quotes the value refused, which is left out too.
    The worker log keeps the whole error."""
    name = exc.__class__.__name__
    statement = exc.statement if isinstance(exc, StatementError) else None
    if isinstance(exc, StatementError):
        driver: BaseException | None = exc.orig
    elif isinstance(exc, psycopg2.Error):
        driver = exc
    else:  # our own names for the hot paths' driver errors (app/db.py) carry its text: the cause's is shown
        driver = exc.__cause__ if isinstance(exc.__cause__, psycopg2.Error) else None
    if isinstance(driver, psycopg2.Error):
        text = f"{name}: {_driver_message(driver)}"
    elif isinstance(exc, StatementError):  # a Python error binding a parameter: its type only
        text = f"{name}: {driver.__class__.__name__ if driver is not None else 'statement error'}"
    else:
        text = f"{name}: {exc}"
    if statement:
        text += f"\n[SQL: {statement}]"
    return text


def _driver_message(err: psycopg2.Error) -> str:
    code = getattr(err, "pgcode", None)
    primary = getattr(getattr(err, "diag", None), "message_primary", None)
    if not primary:  # no answer from the server (a lost connection): the driver's first line
        primary = next(iter(str(err).strip().splitlines()), "")
    if code and (code.startswith("22") or code == "42601"):  # a data exception, a syntax error
        primary = without_quoted_value(primary)
    return f"{err.__class__.__name__} {code}: {primary}" if code else f"{err.__class__.__name__}: {primary}"


def _driver_connection_lost(exc: BaseException | None) -> bool:
    """The driver's error says the connection is gone: closed (InterfaceError), or an
    OperationalError the server never answered with a code (refused, dropped, timed out)."""
    if isinstance(exc, psycopg2.InterfaceError):
        return True
    return isinstance(exc, psycopg2.OperationalError) and getattr(exc, "pgcode", None) is None


def count_failure(task_name: str, kind: FailureKind, action: str) -> None:
    """dunning_task_failures_total: ``action`` is retry (the task retries itself), retrying (its own
    retries are over, beat re-drives it) or dead (for an operator)."""
    metrics.TASK_FAILURES.labels(task=task_name, failure_class=kind.value, action=action).inc()


# A recompute given up as dead parks the version of its account's pending request it had taken (and
# failed on: its delete rolled back), so that the stale-request re-drive does not send it again every
# minute, to fail the same way (app/redrive.py STALE_REQUESTS). Only that version: touched_at equal
# to the one the run took. A request created or asked for again while the run was in flight (a
# webhook, a review) has a newer touched_at, or waits for this transaction's row lock and then does,
# and is sent again; so is a parked one once anything asks for it anew. The request is never deleted.
PARK_REQUEST = """
UPDATE recompute_request SET parked_touch = touched_at
 WHERE account_id = %(account)s AND touched_at = %(touched)s
"""


def record_stuck(engine: Engine, task_name: str, args: dict[str, Any], account_id: str | None,
                 kind: FailureKind, error: str, attempts: int, state: str,
                 stripe_event_id: str | None = None, per_args: bool = False,
                 park_request: datetime | None = None) -> bool:
    """One row per (task, account) that is not resolved, or per (task, account, args) with
    ``per_args`` (one payment's failure is not another's): updated on every new failure, also by
    a give-up at the same moment (the writers of a task and account take turns).
    ``park_request``: the touched_at of the account's recompute request the failed run had taken,
    parked in the same transaction if still that version (see PARK_REQUEST). False when the row
    could not be written, whatever the reason: the database down or busy (often the very failure
    being recorded), or one that does not pass by itself (a permission refused, a table or column
    missing mid-deploy), logged at CRITICAL for an operator. An account id PostgreSQL cannot take is
    no such failure: the row is filed under no account, naming the id escaped.
    The caller then keeps the work some other way (DESIGN section 8: a give-up is never dropped)."""
    error = storable_text(error)
    args = storable_args(args)
    if account_id is not None and storable_text(account_id) != account_id:
        # An id no row can hold (a NUL, a lone surrogate: sent to the task by hand, e.g. through
        # Flower's API; every entrypoint refuses one): no account by that id can ever exist, so its
        # work can never succeed. Filed under no account, the id kept escaped in the error, so the
        # give-up is recorded and seen rather than retried every minute for ever.
        error = storable_text(f"account id {account_id!r} cannot be stored (filed under no account): {error}")
        account_id = None
    try:
        with unit_of_work(engine) as conn:
            # One writer at a time per task and account: two give-ups at once (two workers, a
            # database blip) each found no row (the other's not yet committed) and both inserted.
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 0))",
                                 {"key": f"subs_stuck_events:{task_name}:{account_id or ''}"})
            if park_request is not None and account_id is not None:
                conn.exec_driver_sql(PARK_REQUEST, {"account": account_id, "touched": park_request})
            updated = conn.exec_driver_sql(
                """UPDATE subs_stuck_events SET error_class = %(kind)s, error = %(error)s, attempts = %(attempts)s,
                          state = %(state)s, last_failed_at = now(), task_args = %(args)s,
                          next_redrive_at = CASE WHEN %(state)s = 'dead' THEN NULL
                                                 ELSE now() + interval '5 minutes' END
                    WHERE id = (SELECT id FROM subs_stuck_events
                                 WHERE task_name = %(task)s AND account_id IS NOT DISTINCT FROM %(account)s
                                   AND (NOT %(per_args)s OR task_args = %(args)s)
                                   AND state <> 'resolved' ORDER BY id LIMIT 1)
                RETURNING id""",
                {"kind": kind.value, "error": error[:2000], "attempts": attempts, "state": state,
                 "args": Json(args), "task": task_name, "account": account_id, "per_args": per_args},
            ).first()
            if updated is None:
                conn.exec_driver_sql(
                    """INSERT INTO subs_stuck_events (account_id, stripe_event_id, task_name, task_args, error_class,
                                                      error, attempts, state, next_redrive_at)
                       VALUES (%(account)s, %(event)s, %(task)s, %(args)s, %(kind)s, %(error)s, %(attempts)s,
                               %(state)s, CASE WHEN %(state)s = 'dead' THEN NULL
                                               ELSE now() + interval '5 minutes' END)""",
                    {"account": account_id, "event": stripe_event_id, "task": task_name, "args": Json(args),
                     "kind": kind.value, "error": error[:2000], "attempts": attempts, "state": state},
                )
    except Exception as exc:  # the database itself may be what failed
        kind_met = classify(exc)
        if kind_met in PASSING:
            log.exception("could not record stuck work for %s %s", task_name, account_id)
        else:
            # Not an outage that ends by itself. Answered "recorded", the task gave up and its work
            # was dropped with no row; the caller keeps it instead (retrying at the longest
            # countdown, or its message requeued) until an operator fixes the cause.
            log.critical("could not record stuck work for %s %r (%s, which does not pass by itself): the work is "
                         "kept, not recorded, until the row can be written", task_name, account_id, kind_met,
                         exc_info=True)
        return False
    return True


def storable_args(value: Any) -> Any:
    """A task's arguments as jsonb takes them: every string in them made storable (storable_text;
    jsonb refuses the NUL escape too)."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, Mapping):
        return {storable_text(str(k)): storable_args(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable_args(v) for v in value]
    return value


def storable_text(text: str) -> str:
    """An error's text as PostgreSQL's text takes it: it may hold what a remote side sent (a Stripe
    error's message, a proxy's answer before it): a NUL character, which PostgreSQL refuses, or a
    lone surrogate (JSON's "\\ud83d", which json.loads keeps), which has no UTF-8 for psycopg2 to
    send: the whole row was lost, and record_stuck answered "recorded" all the same. Both are kept
    visible as escapes, as the outbox keeps an answer's (app/outbox/relay.py storable)."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def account_of(engine: Engine, query: str, row_id: int) -> str | None:
    """The account of the row a failing task works on (``query`` selects it by ``%(id)s``), to
    record the failure under; None when there is none, or the database is what failed."""
    try:
        with engine.connect() as conn:
            found = conn.exec_driver_sql(query, {"id": int(row_id)}).scalar()
    except Exception:  # the database may be what failed: the failure is recorded without it
        return None
    return str(found) if found is not None else None


def resolve_stuck(engine: Engine, task_name: str, account_id: str | None, args: dict[str, Any] | None = None) -> None:
    """The task's rows for the account (only those of ``args``, when given) are resolved. A row of
    ``args`` may name more (a killed run's, kept by name with its bookkeeping: a settlement's
    ``waited``): it is the same work's."""
    with unit_of_work(engine) as conn:
        conn.exec_driver_sql(
            "UPDATE subs_stuck_events SET state = 'resolved', resolved_at = now(), next_redrive_at = NULL "
            "WHERE task_name = %(task)s AND account_id IS NOT DISTINCT FROM %(account)s AND state <> 'resolved' "
            "AND (%(args)s::jsonb IS NULL OR task_args @> %(args)s::jsonb)",
            {"task": task_name, "account": account_id, "args": Json(args) if args is not None else None},
        )
