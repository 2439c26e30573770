"""Alembic environment: the URL comes from the caller (``dunning db upgrade``)."""

import contextlib
import sys
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
# The backend holding the migration lock (pg_advisory_lock(7281001): one bigint key, objid its low 32 bits).
LOCK_HOLDER = """
SELECT pid FROM pg_locks
 WHERE locktype = 'advisory' AND classid = 0 AND objid = 7281001 AND objsubid = 1 AND granted
   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
 LIMIT 1
"""


def _lock(connection: Connection) -> None:
    """Take the migration lock (a session lock: it outlives the commits, which leave the transaction
    to Alembic, as a migration's autocommit_block needs), waiting for another process that holds it.

    Waited for by trying, between transactions, not by a blocking pg_advisory_lock: a statement
    waiting holds its snapshot, and the holder's CREATE INDEX CONCURRENTLY waits for every older
    snapshot to end, so the two would deadlock and PostgreSQL would fail one of the migrations."""
    said = False
    while True:
        got = connection.exec_driver_sql("SELECT pg_try_advisory_lock(7281001)").scalar()
        holder = None if got or said else connection.exec_driver_sql(LOCK_HOLDER).scalar()
        connection.commit()
        if got:
            return
        if not said:
            # Else `make run` or `dunning db upgrade` says "migrating" and then nothing for as long as
            # the other holds the lock (a deploy's migrate job, a stuck session): it looks hung.
            who = f" (PostgreSQL backend pid {holder})" if holder else ""
            print(f"waiting for another migration of this database to finish: it holds the migration lock{who}",
                  file=sys.stderr, flush=True)
            said = True
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
            # A transaction per migration: each one's locks (ACCESS EXCLUSIVE on the tables it alters)
            # end with it. In one transaction for them all, a migration waiting for its table (a long
            # transaction on it, the shared subs_account the owner writes) held every table the ones
            # before it altered, subs_dunning and the webhooks' mirror tables among them, as long as it
            # waited. Each committed migration is a revision the next run starts from.
            context.configure(connection=connection, target_metadata=target_metadata, transaction_per_migration=True)
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
