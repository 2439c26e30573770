"""Accounts stuck in ``lifting`` (a bad-debt payment in flight) longer than the guard window.

Lifting is the guard state: neither the sweep nor recompute puts bad debt back over it. An
account that stays there past the window has a payment whose outcome never arrived. The
reconciliation asks Stripe about it (app/payments/bad_debt_reconcile.py); until it settles, it is
counted (gauge) and listed (GET /ops/lifting) with what the reconciliation has found so far.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from app import metrics

STUCK_LIFTING_SQL = """
SELECT d.account_id, d.changed_at, min(b.created_at) AS payment_since, min(b.id) AS payment_id,
       min(b.amount) AS amount, min(b.currency) AS currency, min(b.stripe_status) AS stripe_status,
       min(b.reconcile_checks) AS checks,
       min(b.reconcile_after) AS next_check, min(b.not_found_since) AS not_found_since
  FROM subs_dunning d
  LEFT JOIN bad_debt_payment b ON b.account_id = d.account_id AND b.state = 'pending'
 WHERE d.status = 'lifting'
 GROUP BY d.account_id, d.changed_at
HAVING coalesce(min(b.created_at), d.changed_at) < %(before)s
 ORDER BY coalesce(min(b.created_at), d.changed_at), d.account_id
 LIMIT %(limit)s
"""

COUNT_SQL = "SELECT count(*) FROM (" + STUCK_LIFTING_SQL.replace("LIMIT %(limit)s", "") + ") stuck"


def stuck_in_lifting(conn: Connection, guard_minutes: int, now: datetime, limit: int = 100) -> list[dict[str, Any]]:
    before = now - timedelta(minutes=guard_minutes)
    rows = conn.exec_driver_sql(STUCK_LIFTING_SQL, {"before": before, "limit": limit}).fetchall()
    out = []
    for r in rows:
        since = r.payment_since or r.changed_at
        out.append({"account_id": r.account_id, "lifting_since": since.isoformat(),
                    "minutes": int((now - since).total_seconds() // 60), "payment_id": r.payment_id,
                    "amount": r.amount, "currency": r.currency,
                    # one pending payment per account: its reconciliation with Stripe so far
                    "reconciliation": None if r.payment_id is None else {
                        "checks": r.checks, "stripe_status": r.stripe_status,
                        "next_check": r.next_check.isoformat() if r.next_check else None,
                        "not_found_since": r.not_found_since.isoformat() if r.not_found_since else None}})
    return out


def count_stuck_in_lifting(conn: Connection, guard_minutes: int, now: datetime) -> int:
    before = now - timedelta(minutes=guard_minutes)
    count = int(conn.exec_driver_sql(COUNT_SQL, {"before": before}).scalar_one())
    metrics.STUCK_IN_LIFTING.set(count)
    return count
