"""Alembic, driven from code so `dunning db upgrade` needs no alembic.ini in the working dir."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from app.config import ConfigError

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(database_url: str) -> Config:
    cfg = Config(str(MIGRATIONS / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


def current(database_url: str) -> None:
    command.current(alembic_config(database_url), verbose=False)



def missing_revisions(database_url: str) -> list[str] | None:
    """The migrations this code has and the database lacks, oldest first: [] when it is up to date.
    None when the database is at a revision this code does not know (a newer release migrated it:
    not this code's to judge)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from app.db import make_engine

    script = ScriptDirectory.from_config(alembic_config(database_url))
    # The product's engine (connect and statement timeouts): a server that takes the connection and
    # never answers fails the command in seconds, as the command itself would.
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
    finally:
        engine.dispose()
    known = {rev.revision for rev in script.walk_revisions()}
    if not current <= known:
        return None
    lower = "base" if not current else next(iter(current)) if len(current) == 1 else tuple(current)
    lacking = [rev.revision for rev in script.iterate_revisions("heads", lower) if rev.revision not in current]
    return list(reversed(lacking))


class SchemaBehind(ConfigError):
    """The database lacks migrations this code has."""


def require_current_schema(database_url: str) -> None:
    """Raises SchemaBehind, naming what to run, when the database lacks a migration of this code."""
    lacking = missing_revisions(database_url)
    if lacking:
        count = f"{len(lacking)} migrations" if len(lacking) > 1 else "1 migration"
        raise SchemaBehind(f"the database schema is older than this code ({count} not applied, the newest "
                           f"{lacking[-1]}): run `dunning db upgrade` first")
