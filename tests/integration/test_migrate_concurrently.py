"""Two processes migrating at once (web and worker start together, both run `dunning db upgrade`):
one waits for the other's advisory lock (app/migrations/env.py) and both end with the schema at head.

The waiting one must hold no snapshot while it waits: a migration's CREATE INDEX CONCURRENTLY waits
for every transaction older than its own snapshot, so a waiter inside a statement (the blocking
pg_advisory_lock) and the index build would wait for each other, and PostgreSQL's deadlock detector
would fail one of the two migrations (an invalid index left behind, or a process that does not start).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from sqlalchemy import Connection, create_engine, pool

from app.embedded import poll_until
from app.migrate import revisions_missing, upgrade

# The lock env.py takes (pg_advisory_lock(7281001): one bigint key, objid its low 32 bits).
WAITERS_SQL = """
SELECT count(*) FROM pg_locks
 WHERE locktype = 'advisory' AND objid = 7281001 AND NOT granted AND database = (
       SELECT oid FROM pg_database WHERE datname = current_database())
"""
# Or trying it in a loop: the last statement the try, or the commit after it.
TRYING_SQL = """
SELECT count(*) FROM pg_stat_activity
 WHERE datname = current_database() AND pid <> pg_backend_pid()
   AND (query LIKE '%%pg_try_advisory_lock(7281001)%%' OR query = 'COMMIT')
"""
MIGRATE = "import sys; from app.migrate import revisions_missing, upgrade; upgrade(sys.argv[1])"


def _both_waiting(conn: Connection) -> bool:
    """Both processes wait for the lock: blocked on it, or trying it again and again."""
    return (conn.exec_driver_sql(WAITERS_SQL).scalar() or 0) + (conn.exec_driver_sql(TRYING_SQL).scalar() or 0) >= 2


def test_two_processes_migrating_at_once_both_succeed_through_the_concurrent_index_builds(empty_database: str) -> None:
    upgrade(empty_database, "invoices_quoted")  # the revision before the first CONCURRENTLY build
    engine = create_engine(empty_database, poolclass=pool.NullPool)
    with engine.connect() as holder:
        # Held by the test so that both processes are waiting before either migrates.
        holder.exec_driver_sql("SELECT pg_advisory_lock(7281001)")
        holder.commit()
        procs = [subprocess.Popen([sys.executable, "-c", MIGRATE, empty_database],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        try:
            deadline = time.monotonic() + 60
            while True:
                waiting = _both_waiting(holder)
                holder.commit()
                if waiting or time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    break
        finally:
            holder.exec_driver_sql("SELECT pg_advisory_unlock(7281001)")
            holder.commit()
        outcomes = [p.communicate(timeout=300) for p in procs]
    errors = [[line for line in err.splitlines() if "Error" in line or "DETAIL" in line] for _, err in outcomes]
    assert [p.returncode for p in procs] == [0, 0], errors
    with engine.connect() as conn:
        assert revisions_missing(conn) == []
        invalid = conn.exec_driver_sql("SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid").all()
        assert invalid == []
    engine.dispose()



def test_a_migration_waiting_for_another_says_so(empty_database: str) -> None:
    """`make run` (or `dunning db upgrade`) said "migrating the database to the newest schema" and then
    nothing for as long as another migration held the lock (a deploy's migrate job on the same
    database, a stuck session holding it): it looked hung. It says what it waits for, once."""
    engine = create_engine(empty_database, poolclass=pool.NullPool)
    lines: list[str] = []
    with engine.connect() as holder:
        holder.exec_driver_sql("SELECT pg_advisory_lock(7281001)")
        holder.commit()
        holder_pid = holder.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        holder.commit()
        proc = subprocess.Popen([sys.executable, "-c", MIGRATE, empty_database],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
        reader.start()
        try:
            # It waits for the lock either way: until it says so, or for 30 s.
            poll_until(lambda: bool(lines) or proc.poll() is not None, 30)
            said = "".join(lines)
        finally:
            holder.exec_driver_sql("SELECT pg_advisory_unlock(7281001)")
            holder.commit()
        proc.wait(300)
        reader.join(30)
    assert proc.returncode == 0, "".join(lines)
    assert said.startswith("waiting for another migration of this database to finish"), "".join(lines)
    assert f"PostgreSQL backend pid {holder_pid}" in said
    assert "".join(lines).count("waiting for another migration") == 1
    with engine.connect() as conn:
        assert revisions_missing(conn) == []
    engine.dispose()
