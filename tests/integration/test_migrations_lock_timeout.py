"""A migration's ALTER TABLE takes ACCESS EXCLUSIVE on its table. Queued behind a long transaction on it
(a sweep's page, a report), it queued every writer of the table (webhook ingest, recomputes) behind
itself for as long as it waited: an outage of the running fleet during a deploy. Each migration's
transaction now waits at most MIGRATION_LOCK_TIMEOUT_SECONDS for a lock (app/migrations/env.py), is
rolled back past it, and `dunning db upgrade` says so in one line. Autocommit blocks (CREATE INDEX
CONCURRENTLY, which waits for every older transaction by lock waits too) are not bounded."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import create_engine, pool

from app import migrate
from app.config import normalize_database_url
from app.embedded import wait_for
from tests.integration.migration_setup import upgrade_to_before
from tests.integration.test_cli_recompute import dunning

COLUMN = """
SELECT count(*) FROM information_schema.columns WHERE table_name = 'stripe_payment_method'
   AND column_name = 'prev_card'
"""


def test_db_upgrade_behind_a_long_transaction_on_its_table_stops_with_one_line_and_applies_nothing(
        empty_database: str) -> None:
    url = empty_database
    before = upgrade_to_before(url, "payment_method_prev_card")
    engine = create_engine(normalize_database_url(url), poolclass=pool.NullPool)
    blocker = engine.connect()
    try:
        blocker.begin()
        blocker.exec_driver_sql("LOCK TABLE stripe_payment_method IN ACCESS SHARE MODE")  # a long read of it
        pid = blocker.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        done = dunning("db", "upgrade", database_url=url)  # bounded: subprocess timeout
    finally:
        blocker.rollback()
        blocker.close()
    assert done.returncode == 1, done.stderr[-800:]
    assert "Traceback" not in done.stderr, done.stderr[-800:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: migration: another transaction holds stripe_payment_method"), lines[0]
    assert f"PostgreSQL backend pid {pid}" in lines[0] and "run the upgrade again" in lines[0], lines[0]
    assert f"stays at revision {before}" in lines[0], lines[0]
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == before
        assert conn.exec_driver_sql(COLUMN).scalar() == 0
        # the migration lock was given back: the next run is not told to wait for another migration
        assert conn.exec_driver_sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                    "AND objid = 7281001").scalar() == 0

    again = dunning("db", "upgrade", database_url=url)  # the holder gone: it goes through
    assert again.returncode == 0, again.stderr[-800:]
    with engine.connect() as conn:
        assert not migrate.revisions_missing(conn)
        assert conn.exec_driver_sql(COLUMN).scalar() == 1
    engine.dispose()


# The migration's backend waiting for an older transaction to end (CREATE INDEX CONCURRENTLY's wait:
# a virtualxid lock), longer than ten times the lock timeout the test sets.
WAITING_LONG = """
SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE NOT l.granted AND l.locktype = 'virtualxid' AND a.datname = current_database()
   AND a.query LIKE 'CREATE INDEX CONCURRENTLY%%' AND clock_timestamp() - a.query_start > interval '1 second'
"""
VALID = """
SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'ix_outbox_prunable'
"""


def test_create_index_concurrently_waits_for_older_transactions_past_the_lock_timeout(
        empty_database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bounded too, the index build would fail behind any long transaction of the database (an
    invalid index left behind) while it blocks no writer."""
    url = empty_database
    upgrade_to_before(url, "outbox_prunable_by_age")
    monkeypatch.setattr(migrate, "MIGRATION_LOCK_TIMEOUT_SECONDS", 0.1)
    engine = create_engine(normalize_database_url(url), poolclass=pool.NullPool)
    older = engine.connect()
    older.begin()
    older.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    older.exec_driver_sql("SELECT count(*) FROM sweep_error")  # a snapshot older than the index build (a sweep's page)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            migrate.upgrade(url, "outbox_prunable_by_age")
        except BaseException as exc:  # said by the assertions below
            failed.append(exc)

    migrating = threading.Thread(target=run, name="migrate")
    migrating.start()
    try:
        def waited_long() -> bool:
            with engine.connect() as conn:
                return bool(conn.exec_driver_sql(WAITING_LONG).scalar()) or not migrating.is_alive()

        wait_for(waited_long, 60, "the index build to wait for the older transaction")
        assert migrating.is_alive(), failed
    finally:
        older.rollback()
        older.close()
        migrating.join()
    assert not failed, failed
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "outbox_prunable_by_age"
        assert conn.exec_driver_sql(VALID).scalar() is True
    engine.dispose()
