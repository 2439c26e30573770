"""Alembic environment: the URL comes from the caller (``dunning db upgrade``)."""

import contextlib
import time

from alembic import context
from sqlalchemy import Connection, create_engine, make_url, pool

from app.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


LOCK_POLL_SECONDS = 0.5


def _lock(connection: Connection) -> None:
    """Take the migration lock (a session lock: it outlives the commits, which leave the transaction
    to Alembic, as a migration's autocommit_block needs), waiting for another process that holds it.

    Waited for by trying, between transactions, not by a blocking pg_advisory_lock: a statement
    waiting holds its snapshot, and the holder's CREATE INDEX CONCURRENTLY waits for every older
    snapshot to end, so the two would deadlock and PostgreSQL would fail one of the migrations."""
    while True:
        got = connection.exec_driver_sql("SELECT pg_try_advisory_lock(7281001)").scalar()
        connection.commit()
        if got:
            return
        time.sleep(LOCK_POLL_SECONDS)


# As the runtime's engine (app.db.make_engine): without it, libpq waits for a server that takes the
# connection and never answers (hung, or a firewall dropping after the handshake) for ever, and
# `dunning db upgrade` with it. A connect_timeout in DATABASE_URL is kept.
CONNECT_TIMEOUT_SECONDS = 3


def run_migrations_online() -> None:
    url = make_url(config.get_main_option("sqlalchemy.url") or "")
    connect_args = {} if "connect_timeout" in url.query else {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
    engine = create_engine(url, poolclass=pool.NullPool, connect_args=connect_args)
    with engine.connect() as connection:
        # Two processes starting at once (web and worker) must not both migrate.
        _lock(connection)
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
