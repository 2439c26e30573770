"""Alembic, driven from code so `dunning db upgrade` needs no alembic.ini in the working dir."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection

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
