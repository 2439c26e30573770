"""How far behind the relay is: read by the ops API, the relay task and the metrics."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from app import metrics

BACKLOG_SQL = """
SELECT count(*),
       EXTRACT(EPOCH FROM now() - min(created_at)),
       count(DISTINCT account_id),
       count(*) FILTER (WHERE attempts > 0),
       max(attempts),
       count(*) FILTER (WHERE blocked_at IS NOT NULL)
  FROM outbox WHERE delivered_at IS NULL
"""

OLDEST_SQL = """
SELECT id, account_id, dunning_version, event_type, attempts, last_error, created_at, next_attempt_at,
       last_status, blocked_at
  FROM outbox WHERE delivered_at IS NULL ORDER BY id LIMIT %(limit)s
"""


def backlog(conn: Connection, sample: int = 0) -> dict[str, Any]:
    count, age, accounts, failing, max_attempts, blocked = conn.exec_driver_sql(BACKLOG_SQL).one()
    metrics.OUTBOX_BACKLOG.set(int(count))
    metrics.OUTBOX_BLOCKED.set(int(blocked))
    out: dict[str, Any] = {
        "backlog": int(count),
        "oldest_pending_age_seconds": round(float(age), 3) if age is not None else None,
        "accounts": int(accounts),
        "failing": int(failing),
        "max_attempts": int(max_attempts or 0),
        "blocked": int(blocked),  # refused as wrong by Account Management (app/outbox/answers.py)
    }
    if sample:
        out["oldest"] = [
            {"id": r[0], "account_id": r[1], "dunning_version": r[2], "event_type": r[3], "attempts": r[4],
             "last_error": r[5], "created_at": r[6].isoformat(), "next_attempt_at": r[7].isoformat(),
             "last_status": r[8], "blocked_since": r[9].isoformat() if r[9] else None}
            for r in conn.exec_driver_sql(OLDEST_SQL, {"limit": sample})
        ]
    return out
