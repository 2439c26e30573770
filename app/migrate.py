"""Alembic, driven from code so `dunning db upgrade` needs no alembic.ini in the working dir."""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection

from app.config import ConfigError

MIGRATIONS = Path(__file__).parent / "migrations"

# How long a migration's statement waits for a lock (migrations/env.py: SET LOCAL lock_timeout in each
# migration's transaction, not in its autocommit blocks). Its ALTER TABLE takes ACCESS EXCLUSIVE;
# queued behind a long transaction on the table, it queues every writer of that table behind it.
MIGRATION_LOCK_TIMEOUT_SECONDS = 5.0
LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a statement cancelled by lock_timeout


class MigrationBlocked(Exception):
    """A migration waited for a lock past MIGRATION_LOCK_TIMEOUT_SECONDS and was rolled back (those
    before it stay committed): the message names the table and what to do, for one line of the CLI."""


def alembic_config(database_url: str) -> Config:
    cfg = Config(str(MIGRATIONS / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def _named(revision: str) -> str:
    """``revision`` when it names one; alembic's CommandError (the CLI's `error: migration: ...`)
    when it is empty, or empty after a branch's '@' ("", "@", "head@"): alembic resolves those with a
    bare assert, an AssertionError traceback instead of its "Can't locate revision" for any other."""
    from alembic.util import CommandError

    if not revision.rpartition("@")[2]:
        raise CommandError(f"{revision!r} names no revision (give one: head, base, an id, +1, -1)")
    return revision


@contextmanager
def _resolved(revision: str) -> Iterator[None]:
    """Alembic's CommandError (the CLI's `error: migration: ...`) for a relative revision that counts
    past the newest migration or before the oldest ("head+1", "base+1000", "0001-1", an id "+N" past
    head): alembic resolves those with a bare assert too (alembic/script/revision.py), an
    AssertionError traceback where "+100" and an unknown id are its one line. Raised before any
    migration runs: the database is left as it was. An assert failing anywhere else is raised as is."""
    from alembic.util import CommandError

    try:
        yield
    except AssertionError as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        if not frames or Path(frames[-1].filename).parts[-3:] != ("alembic", "script", "revision.py"):
            raise
        raise CommandError(f"{revision!r} names no revision (it counts past the newest migration or before "
                           "the oldest; give one: head, base, an id, +1, -1)") from None


def upgrade(database_url: str, revision: str = "head") -> list[str]:
    """Migrates to ``revision``. To the newest ("head"), a database at revisions this code does not
    have is left as it is and they are returned (a newer release migrated it, and this code runs
    again: a rollback, whose migrate step must not stop its pods from starting, as every other
    command runs on a newer schema); [] otherwise.

    A database past the first migration has its shared tables checked first, whatever the revision
    (SharedTablesUnfit, nothing migrated): the owner may have changed them since the first migration
    checked them (app/shared_tables.py). The first migration checks them itself."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine, make_url, pool

    from app.shared_tables import require_fit

    _named(revision)
    url = make_url(database_url)
    connect_args = {} if "connect_timeout" in url.query else {"connect_timeout": 3}  # as migrations/env.py
    engine = create_engine(url, poolclass=pool.NullPool, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            heads = sorted(MigrationContext.configure(conn).get_current_heads())
            if heads:
                require_fit(conn)
            if revision in ("head", "heads") and revisions_missing(conn) is None:
                return heads
    finally:
        engine.dispose()
    with _resolved(revision):
        command.upgrade(alembic_config(database_url), _named(revision))
    return []


def downgrade(database_url: str, revision: str) -> None:
    with _resolved(revision):
        command.downgrade(alembic_config(database_url), _named(revision))


def current(database_url: str) -> None:
    command.current(alembic_config(database_url), verbose=False)


def revisions_missing(conn: Connection) -> list[str] | None:
    """The migrations this code has and the database lacks, oldest first: [] when it is up to date.
    None when the database is at a revision this code does not know (a newer release migrated it:
    not this code's to judge)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(MIGRATIONS))
    current = set(MigrationContext.configure(conn).get_current_heads())
    if not current <= {rev.revision for rev in script.walk_revisions()}:
        return None
    lacking = [rev.revision for rev in script.iterate_revisions("heads", tuple(current) or "base")
               if rev.revision not in current]
    return list(reversed(lacking))


class SchemaBehind(ConfigError):
    """The database lacks migrations this code has."""


def require_current_schema(conn: Connection) -> None:
    """Raises SchemaBehind, naming what to run, when the database lacks a migration of this code."""
    lacking = revisions_missing(conn)
    if lacking:
        count = f"{len(lacking)} migrations" if len(lacking) > 1 else "1 migration"
        raise SchemaBehind(f"the database schema is older than this code ({count} not applied, the newest "
                           f"{lacking[-1]}): run `dunning db upgrade` first")
