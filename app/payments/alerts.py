"""Alerts about money for an operator: a ``dead`` stuck row (subs_stuck_events) under a task that
only acknowledges. The operator acts at Stripe (refunds the customer, bills again) and then
re-drives the row: the task succeeds and the row becomes ``resolved``. One open alert per task and
arguments, however often its cause is seen again."""

from __future__ import annotations

from typing import Any

from psycopg2.extras import Json
from sqlalchemy import Connection

ALERT = """
INSERT INTO subs_stuck_events (account_id, task_name, task_args, error_class, error, attempts, state)
SELECT %(account)s, %(task)s, %(args)s, 'invalid_data', %(error)s, 1, 'dead'
 WHERE NOT EXISTS (SELECT 1 FROM subs_stuck_events WHERE task_name = %(task)s AND task_args = %(args)s
                                                   AND state <> 'resolved')
"""


def raise_alert(conn: Connection, account_id: str, task: str, args: dict[str, Any], error: str) -> bool:
    """In the caller's transaction; whether a new alert was written (False: one is open already)."""
    written = conn.exec_driver_sql(ALERT, {"account": account_id, "task": task, "args": Json(args), "error": error})
    return bool(written.rowcount)


REFRESH = """
UPDATE subs_stuck_events SET error = %(error)s, last_failed_at = now()
 WHERE task_name = %(task)s AND task_args = %(args)s AND state <> 'resolved' AND error IS DISTINCT FROM %(error)s
"""


def refresh_alert(conn: Connection, task: str, args: dict[str, Any], error: str) -> bool:
    """In the caller's transaction: the open alert of ``task`` and ``args`` says ``error`` from now
    on (what its cause came to since it was raised); whether it said something else."""
    return bool(conn.exec_driver_sql(REFRESH, {"task": task, "args": Json(args), "error": error}).rowcount)
