"""Alembic environment: the URL comes from the caller (``dunning db upgrade``)."""

import contextlib

from alembic import context
from sqlalchemy import create_engine, pool

from app.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    with engine.connect() as connection:
        # Two processes starting at once (web and worker) must not both migrate.
        connection.exec_driver_sql("SELECT pg_advisory_lock(7281001)")
        # A session lock: it outlives this commit, which leaves the transaction to Alembic (a
        # migration's autocommit_block needs Alembic to own it).
        connection.commit()
        try:
            context.configure(connection=connection, target_metadata=target_metadata)
            with context.begin_transaction():
                context.run_migrations()
        except BaseException:
            # The migration's own error is the one to raise: unlocking inside its aborted transaction
            # would fail with "current transaction is aborted" and hide it. A session lock outlives
            # the rollback; if even that fails, the connection's close (NullPool) frees the lock.
            with contextlib.suppress(Exception):
                connection.rollback()
                connection.exec_driver_sql("SELECT pg_advisory_unlock(7281001)")
                connection.commit()
            raise
        connection.exec_driver_sql("SELECT pg_advisory_unlock(7281001)")
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
