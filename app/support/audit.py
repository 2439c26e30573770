"""The audit log of support actions: who did what to which account."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg2.extras import Json
from sqlalchemy import Connection


def record(conn: Connection, actor: str, action: str, account_id: str | None, detail: dict[str, Any]) -> int:
    row = conn.exec_driver_sql(
        "INSERT INTO audit_log (actor, action, account_id, detail) VALUES (%(actor)s, %(action)s, %(account)s, "
        "%(detail)s) RETURNING id",
        {"actor": actor, "action": action, "account": account_id, "detail": Json(detail)},
    ).scalar_one()
    return int(row)


def add_detail(conn: Connection, entry: int, detail: dict[str, Any]) -> None:
    """What became of an audited action (e.g. it could not be queued)."""
    conn.exec_driver_sql("UPDATE audit_log SET detail = detail || %(detail)s WHERE id = %(id)s",
                         {"detail": Json(detail), "id": entry})


# Its expression and condition are those of the index ix_audit_log_recompute_task.
# Its age by the database's clock, which wrote ``at``: web hosts' clocks differ from it and each other.
TASK_ACCOUNT_SQL = ("SELECT account_id, at, now() - at AS age, detail->>'queued' = 'false' AS refused FROM audit_log "
                    "WHERE action = 'recompute' AND detail->>'task_id' = %(task)s LIMIT 1")


@dataclass(frozen=True)
class SupportTask:
    """A recompute support started, as its audit row tells: whose, when, and whether the broker took it."""

    account_id: str
    requested_at: datetime
    age: timedelta  # since it was requested, by the database's clock
    queued: bool


def recompute_task(conn: Connection, task_id: str) -> SupportTask | None:
    """The recompute that support started with this task id, or None for a task support never started."""
    row = conn.exec_driver_sql(TASK_ACCOUNT_SQL, {"task": task_id}).first()
    if row is None:
        return None
    return SupportTask(account_id=str(row.account_id), requested_at=row.at, age=row.age, queued=not row.refused)
