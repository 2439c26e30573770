"""`dunning` run as a database user without the privileges the command needs: one `error:` line
naming what PostgreSQL refused, never a traceback (real subprocesses, a database of its own)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from app.migrate import upgrade
from tests.integration.test_cli_recompute import dunning


@pytest.fixture
def unprivileged(postgres_admin: str, empty_database: str) -> Iterator[str]:
    """DATABASE_URL of a login role that may connect to the empty database and nothing more (no
    CREATE on its schema, as PostgreSQL 15+ has it for every role but the owner)."""
    role = f"dunning_test_nopriv_{uuid.uuid4().hex[:8]}"
    admin = create_engine(postgres_admin, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
    owner = create_engine(empty_database, isolation_level="AUTOCOMMIT")
    with owner.connect() as conn:
        conn.exec_driver_sql("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    owner.dispose()
    try:
        yield make_url(empty_database).set(username=role, password=None).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP OWNED BY "{role}"')
            conn.exec_driver_sql(f'DROP ROLE IF EXISTS "{role}"')
        admin.dispose()


def test_db_upgrade_by_a_user_who_may_not_create_tables_says_so(unprivileged: str) -> None:
    """The migration's CREATE TABLE is refused; Alembic's environment then unlocked its advisory lock
    in the aborted transaction, and the traceback ended on "current transaction is aborted", the
    refusal itself hidden above it."""
    done = dunning("db", "upgrade", database_url=unprivileged)
    assert done.returncode == 2, done.stderr[-600:]
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert done.stderr.startswith("error: ") and "permission denied for schema public" in done.stderr


def test_recompute_by_a_user_who_may_not_read_the_tables_says_so(empty_database: str, unprivileged: str) -> None:
    upgrade(empty_database)  # the schema, made by its owner
    done = dunning("recompute", "acct_1", database_url=unprivileged)
    assert done.returncode == 2, done.stderr[-600:]
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert done.stderr.startswith("error: ") and "permission denied for table" in done.stderr


def test_a_migration_refused_raises_the_refusal_not_the_aborted_transaction(unprivileged: str) -> None:
    """app.migrate.upgrade (the CLI, make run, the tests): Alembic's environment unlocked its
    advisory lock inside the aborted transaction, so the error raised was "current transaction is
    aborted" and the refusal itself was only its context."""
    from sqlalchemy.exc import ProgrammingError

    with pytest.raises(ProgrammingError) as raised:
        upgrade(unprivileged)
    assert "permission denied for schema public" in str(raised.value)
    assert getattr(raised.value.orig, "pgcode", None) == "42501"
