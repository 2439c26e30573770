"""The migrations build the schema the models describe: what Alembic's autogenerate would find to
change after `dunning db upgrade` is nothing. A model changed without its migration (or the
reverse) fails here rather than in production."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from app.migrate import upgrade
from app.models import Base
from tests import servers


def test_the_migrated_schema_is_the_models_schema(empty_database: str) -> None:
    upgrade(empty_database)
    engine = create_engine(empty_database)
    try:
        with engine.connect() as conn:
            # Server defaults too: a default the migration evaluates once (a constant) where the model
            # has one evaluated per row (now()), or none where the model has one, is a difference.
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            differences = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert differences == []


# What Alembic's comparison leaves out: a partial index's WHERE (compare_metadata finds no difference
# between `WHERE state = 'dispatched'` and any other predicate), an index's method and expressions as
# PostgreSQL stores them, and every constraint's definition (a CHECK's expression, a foreign key's
# ON DELETE). PostgreSQL's own text of each, by name, in the migrated database and in one the models
# create.
INDEXES = ("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() "
           "AND tablename <> 'alembic_version'")
CONSTRAINTS = ("SELECT conrelid::regclass::text || '.' || conname, pg_get_constraintdef(oid) FROM pg_constraint "
               "WHERE connamespace = current_schema()::regnamespace AND conrelid <> 0 "
               "AND conrelid::regclass::text <> 'alembic_version'")


def _definitions(url: str) -> dict[str, dict[str, str]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {"indexes": dict(conn.exec_driver_sql(INDEXES).all()),
                    "constraints": dict(conn.exec_driver_sql(CONSTRAINTS).all())}
    finally:
        engine.dispose()


def test_the_migrated_indexes_and_constraints_are_the_models_to_the_letter(empty_database: str,
                                                                            postgres_admin: str) -> None:
    upgrade(empty_database)
    with servers.test_database(postgres_admin) as modelled:
        engine = create_engine(modelled)
        try:
            with engine.begin() as conn:
                Base.metadata.create_all(conn)
        finally:
            engine.dispose()
        expected = _definitions(modelled)
    migrated = _definitions(empty_database)
    assert migrated["indexes"] and migrated["constraints"]
    assert migrated == expected
