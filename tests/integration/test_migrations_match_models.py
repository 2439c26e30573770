"""The migrations build the schema the models describe: what Alembic's autogenerate would find to
change after `dunning db upgrade` is nothing. A model changed without its migration (or the
reverse) fails here rather than in production."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from app.migrate import upgrade
from app.models import Base


def test_the_migrated_schema_is_the_models_schema(empty_database: str) -> None:
    upgrade(empty_database)
    engine = create_engine(empty_database)
    try:
        with engine.connect() as conn:
            differences = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert differences == []
