"""What the migration tests share: a database at the schema a migration meets, and the reviews due."""

from __future__ import annotations

from datetime import datetime

from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from app.migrate import alembic_config, upgrade
from app.redrive import DUE_REVIEWS


def upgrade_to_before(url: str, revision: str) -> str:
    """Migrate the database at ``url`` to the revision just before ``revision``; returns that one."""
    before = ScriptDirectory.from_config(alembic_config(url)).get_revision(revision).down_revision
    assert isinstance(before, str)
    upgrade(url, before)
    return before


def due_reviews(engine: Engine, now: datetime) -> list[str]:
    """The accounts whose review the re-drive would request at ``now`` (at most 100)."""
    with engine.connect() as conn:
        return [r[0] for r in conn.exec_driver_sql(DUE_REVIEWS, {"limit": 100, "now": now})]
