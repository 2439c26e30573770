"""The audit log of support actions: who did what to which account."""

from __future__ import annotations

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
TASK_ACCOUNT_SQL = ("SELECT account_id FROM audit_log WHERE action = 'recompute' AND detail->>'task_id' = %(task)s "
                    "LIMIT 1")


def recompute_task_account(conn: Connection, task_id: str) -> str | None:
    """The account of a recompute that support started, or None for a task support never started."""
    row = conn.exec_driver_sql(TASK_ACCOUNT_SQL, {"task": task_id}).first()
    return str(row[0]) if row is not None else None
