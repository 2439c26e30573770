"""A deploy's migrations run as one `dunning db upgrade`; each takes the locks its DDL needs (ACCESS
EXCLUSIVE on the table it alters). Run in one transaction, every lock was held until the last
migration ended: a migration waiting for a table (a long transaction on it; the shared subs_account
the owner writes) held the tables the migrations before it altered, subs_dunning (every recompute
reads it) and stripe_subscription (every subscription webhook writes it), for as long as it waited."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import create_engine, pool

from app import migrate as migrations
from app.config import normalize_database_url
from app.embedded import wait_for
from app.migrate import upgrade
from tests.integration.migration_setup import upgrade_to_before

# The migrations from dunning_announced_failures (subs_dunning) to payment_method_prev_card
# (stripe_payment_method), which the test keeps waiting.
EARLIER_TABLES = {"subs_dunning", "stripe_subscription", "stripe_customer_state"}

WAITING_FOR = """
SELECT pid FROM pg_locks
 WHERE NOT granted AND locktype = 'relation' AND relation = 'stripe_payment_method'::regclass
   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
HELD = """
SELECT c.relname FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
 WHERE l.pid = %(pid)s AND l.granted AND l.mode = 'AccessExclusiveLock'
"""


def test_a_migration_waiting_for_its_table_holds_none_of_the_tables_the_migrations_before_it_altered(
        empty_database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = empty_database
    # Waits as long as the test looks (a migration waiting past it is rolled back: test_migrations_lock_timeout).
    monkeypatch.setattr(migrations, "MIGRATION_LOCK_TIMEOUT_SECONDS", 600.0)
    upgrade_to_before(url, "dunning_announced_failures")
    engine = create_engine(normalize_database_url(url), poolclass=pool.NullPool)
    blocker = engine.connect()
    blocker.begin()
    blocker.exec_driver_sql("LOCK TABLE stripe_payment_method IN ACCESS SHARE MODE")  # a long read of it
    failed: list[BaseException] = []

    def migrate() -> None:
        try:
            upgrade(url, "payment_method_prev_card")
        except BaseException as exc:  # said by the assertions below
            failed.append(exc)

    migrating = threading.Thread(target=migrate, name="migrate")
    migrating.start()
    try:
        waiting: list[int] = []

        def blocked() -> bool:
            with engine.connect() as conn:
                waiting[:] = [r[0] for r in conn.exec_driver_sql(WAITING_FOR)]
            return bool(waiting) or not migrating.is_alive()

        wait_for(blocked, 60, "the migration to wait for stripe_payment_method")
        assert waiting, failed
        with engine.connect() as conn:
            held = {r[0] for r in conn.exec_driver_sql(HELD, {"pid": waiting[0]})}
        assert not held & EARLIER_TABLES, held
    finally:
        blocker.rollback()
        blocker.close()
        migrating.join()
    assert not failed, failed
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "payment_method_prev_card"
        assert conn.exec_driver_sql(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'stripe_payment_method' "
            "AND column_name = 'prev_card'").scalar() == 1
    engine.dispose()
