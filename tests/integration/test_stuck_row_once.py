"""Two runs of one task for one account giving up at the same moment (two workers, a database
blip) write one stuck row between them, not one each: each looked for the other's row before
either had committed it, and both inserted (DESIGN section 8: no duplicate rows for the same
work; the support page listed the work twice and beat re-drove it twice)."""

from __future__ import annotations

import threading

from sqlalchemy import Engine

from tasks.failures import FailureKind, record_stuck
from tests.conftest import wait_for

TASK = "tasks.recompute_account"


def waiting(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT count(*) FROM pg_locks WHERE NOT granted").scalar_one())


def test_two_give_ups_at_once_write_one_row(engine, accounts):
    account, _ = accounts.create()
    args = {"account_id": account, "trigger": "PAYMENT_FAILED", "cause": None}
    done: list[bool] = []

    def give_up() -> None:
        done.append(record_stuck(engine, TASK, args, account, FailureKind.DATABASE_UNAVAILABLE,
                                 "DatabaseUnavailable: database connection lost", 3, "retrying"))

    before = waiting(engine)
    holder = engine.raw_connection()
    try:
        cursor = holder.cursor()
        # Both writers wait on the table (their first write to it) until both are in flight.
        cursor.execute("LOCK TABLE subs_stuck_events IN SHARE MODE")
        threads = [threading.Thread(target=give_up) for _ in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: waiting(engine) >= before + 2, message="both writers waiting")
    finally:
        holder.rollback()
        holder.close()
    for t in threads:
        t.join(timeout=30)
    assert done == [True, True]
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT state FROM subs_stuck_events WHERE account_id = %(a)s AND task_name = %(t)s",
            {"a": account, "t": TASK}).scalars().all()
    assert rows == ["retrying"]

