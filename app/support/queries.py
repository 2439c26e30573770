"""What the support page shows about one account (reads only)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine

from app import queries


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _rows(conn: Connection, sql: str, account_id: str) -> list[dict[str, Any]]:
    result = conn.exec_driver_sql(sql, {"account": account_id}).mappings().all()
    return [{k: _iso(v) for k, v in row.items()} for row in result]


# How many rows each list shows (the newest): the page says how many there are when there are more
# (TOTALS_SQL), so a long list is never read as the whole of it.
LISTED = 20
PAYMENTS_LISTED = 10

# The retries of the invoices the account owns now, whichever account claimed them: what compute
# counts (app/recompute/gather.py), since an invoice's retries follow it when its customer is moved.
RETRIES_WHERE = """
 WHERE invoice_id IN (SELECT i.id FROM stripe_invoice i JOIN subs_customer c USING (stripe_customer_id)
                       WHERE c.account_id = %(account)s)
"""
RETRIES_SQL = f"""
SELECT id, invoice_id, payment_method_id, retry_number, free, state, scheduled_for, error, created_at
  FROM payment_retry {RETRIES_WHERE}
 ORDER BY id DESC LIMIT {LISTED}
"""
STUCK_SQL = f"""
SELECT id, task_name, error_class, error, attempts, state, first_failed_at, last_failed_at, next_redrive_at,
       resolved_at
  FROM subs_stuck_events WHERE account_id = %(account)s
 ORDER BY (state = 'resolved'), id DESC LIMIT {LISTED}
"""
EPISODES_SQL = f"""
SELECT id, entered_at, reason, failure_class, products, exited_at, exit_how, duration_seconds
  FROM bad_debt_episode WHERE account_id = %(account)s ORDER BY entered_at DESC LIMIT {LISTED}
"""
PAYMENTS_SQL = f"""
SELECT id, amount, currency, state, failure_reason, stripe_payment_intent_id, created_at, updated_at
  FROM bad_debt_payment WHERE account_id = %(account)s ORDER BY id DESC LIMIT {PAYMENTS_LISTED}
"""
TOTALS_SQL = f"""
SELECT (SELECT count(*) FROM payment_retry {RETRIES_WHERE}) AS retries,
       (SELECT count(*) FROM subs_stuck_events WHERE account_id = %(account)s) AS stuck,
       (SELECT count(*) FROM subs_stuck_events WHERE account_id = %(account)s AND state <> 'resolved')
         AS stuck_unresolved,
       (SELECT count(*) FROM bad_debt_episode WHERE account_id = %(account)s) AS episodes,
       (SELECT count(*) FROM bad_debt_payment WHERE account_id = %(account)s) AS bad_debt_payments
"""


def totals(conn: Connection, account_id: str) -> dict[str, int]:
    """How many rows each list has in all (the lists show the newest LISTED, PAYMENTS_LISTED)."""
    row = conn.exec_driver_sql(TOTALS_SQL, {"account": account_id}).mappings().one()
    return {k: int(v) for k, v in row.items()}


# The account's calls to Account Management not gone yet (app/outbox/relay.py), in the order they go:
# the first holds back the rest. Read from the partial index on undelivered rows (ix_outbox_pending),
# never the delivered history kept for the retention period. ``held``: the relay's _held_now wrote
# "held: ..." (a cancellation waiting for a bad-debt payment in flight); a later failure overwrites it.
OUTBOX_SQL = """
SELECT id, event_type, dunning_version,
       CASE WHEN blocked_at IS NOT NULL THEN 'blocked'
            WHEN last_error LIKE 'held: %%' THEN 'held'
            ELSE 'waiting' END AS state,
       attempts, last_status, last_error, created_at, next_attempt_at, blocked_at AS blocked_since
  FROM outbox WHERE account_id = %(account)s AND delivered_at IS NULL
 ORDER BY id LIMIT 20
"""
OUTBOX_COUNT_SQL = """
SELECT count(*), count(blocked_at) FROM outbox WHERE account_id = %(account)s AND delivered_at IS NULL
"""


def outbox(conn: Connection, account_id: str) -> dict[str, Any]:
    """How many of the account's rows wait (of which blocked) and the first of them; last_error is
    stored masked and bounded by the relay (app/outbox/answers.py)."""
    undelivered, blocked = conn.exec_driver_sql(OUTBOX_COUNT_SQL, {"account": account_id}).one()
    return {"undelivered": int(undelivered), "blocked": int(blocked), "rows": _rows(conn, OUTBOX_SQL, account_id)}


LIFTING_SQL = """
SELECT coalesce(min(b.created_at), d.changed_at) AS since
  FROM subs_dunning d LEFT JOIN bad_debt_payment b ON b.account_id = d.account_id AND b.state = 'pending'
 WHERE d.account_id = %(account)s AND d.status = 'lifting'
 GROUP BY d.changed_at
"""


def lifting(conn: Connection, account_id: str, now: datetime, guard_minutes: int) -> dict[str, Any] | None:
    """Since when the account is lifting, and whether that is longer than the guard window
    (a payment whose outcome never arrived: someone has to look)."""
    since = conn.exec_driver_sql(LIFTING_SQL, {"account": account_id}).scalar()
    if since is None:
        return None
    return {"since": since.isoformat(), "minutes": int((now - since).total_seconds() // 60),
            "stuck": now - since > timedelta(minutes=guard_minutes), "guard_minutes": guard_minutes}


def account_view_of(engine: Engine, account_id: str, now: datetime, guard_minutes: int) -> dict[str, Any] | None:
    """``account_view`` read in one REPEATABLE READ transaction: its statements all see the same
    moment, so a recompute committing while the page is read cannot put the state of one moment
    beside the invoices of another."""
    with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
        return account_view(conn, account_id, now, guard_minutes)


def account_view(conn: Connection, account_id: str, now: datetime | None = None,
                 guard_minutes: int = 30) -> dict[str, Any] | None:
    dunning = queries.dunning_view(conn, account_id)
    if dunning is None:
        return None
    now = now or datetime.now(UTC)
    return {
        "lifting": lifting(conn, account_id, now, guard_minutes),
        "dunning": dunning,
        "invoices": queries.billing_history(conn, account_id, now or datetime.now(UTC)) or [],
        "retries": _rows(conn, RETRIES_SQL, account_id),
        "stuck": _rows(conn, STUCK_SQL, account_id),
        "episodes": _rows(conn, EPISODES_SQL, account_id),
        "bad_debt_payments": _rows(conn, PAYMENTS_SQL, account_id),
        "outbox": outbox(conn, account_id),
        "totals": totals(conn, account_id),
    }
