"""Alembic environment: the URL comes from the caller (``dunning db upgrade``)."""

import contextlib
import re
import sys
import time

from alembic import context
from sqlalchemy import Connection, create_engine, event, make_url, pool
from sqlalchemy.exc import DBAPIError

from app import migrate
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


def _bound_lock_waits(connection: Connection) -> None:
    """Every transaction of the migrations starts with ``SET LOCAL lock_timeout``: a migration's DDL
    takes ACCESS EXCLUSIVE on the table it alters, and waiting for it behind a long transaction (a
    sweep's page, a report) queues every writer of that table (webhook ingest, recomputes) behind the
    migration, an outage of the running fleet for as long as it waits. Past the timeout the migration
    is rolled back (MigrationBlocked), to be run again.

    Not in an autocommit block (CREATE/DROP INDEX CONCURRENTLY, batched backfills): LOCAL ends with
    the transaction, and those wait for every older transaction by lock waits too, which a timeout
    would fail (leaving an invalid index) while they block no writer."""
    timeout = f"{int(migrate.MIGRATION_LOCK_TIMEOUT_SECONDS * 1000)}ms"

    @event.listens_for(connection, "begin")
    def bounded(conn: Connection) -> None:
        dbapi = conn.connection.dbapi_connection
        if dbapi is None or dbapi.autocommit:
            return
        with contextlib.closing(dbapi.cursor()) as cursor:  # opens the DBAPI transaction (psycopg2)
            cursor.execute(f"SET LOCAL lock_timeout = '{timeout}'")


# The tables a statement names (ALTER TABLE x, CREATE INDEX ... ON x, REFERENCES x, UPDATE x, ...).
_NAMED_TABLES = re.compile(r"\b(?:TABLE|ON|REFERENCES|INTO|FROM|UPDATE)\s+(?:IF\s+(?:NOT\s+)?EXISTS\s+|ONLY\s+)?"
                           r"\"?([A-Za-z_][\w.]*)\"?", re.IGNORECASE)
HOLDERS = """
SELECT c.relname, array_agg(DISTINCT l.pid ORDER BY l.pid)
  FROM unnest(%(names)s::text[]) AS n(name)
  JOIN pg_class c ON c.oid = to_regclass(n.name)
  JOIN pg_locks l ON l.relation = c.oid
 WHERE l.granted AND l.pid <> pg_backend_pid()
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
 GROUP BY c.relname ORDER BY c.relname
"""


def _blocked(connection: Connection, exc: DBAPIError) -> migrate.MigrationBlocked:
    """What the migration that waited past its lock_timeout waited for, for the one line the CLI says:
    the tables its statement names that another backend holds a lock on (PostgreSQL's error names
    none), and the revision the database stays at (the migrations before it were committed)."""
    names = list(dict.fromkeys(_NAMED_TABLES.findall(exc.statement or "")))
    held: list[tuple[str, list[int]]] = []
    at = None
    with contextlib.suppress(Exception):
        held = [(r[0], r[1]) for r in connection.exec_driver_sql(HOLDERS, {"names": names})]
        connection.rollback()
    with contextlib.suppress(Exception):
        at = ", ".join(r[0] for r in connection.exec_driver_sql("SELECT version_num FROM alembic_version")) or None
        connection.rollback()
    if held:
        what = " and ".join(f"{table} (PostgreSQL backend pid {', '.join(map(str, pids[:5]))})" for table, pids in held)
    elif names:
        what = " or ".join(names)
    else:
        what = "a table the migration alters"
    stays = f"the database stays at revision {at}" if at else "the database stays at its revision"
    return migrate.MigrationBlocked(
        f"another transaction holds {what}: the migration waited {migrate.MIGRATION_LOCK_TIMEOUT_SECONDS:g} s "
        f"for it and was rolled back, nothing of it applied ({stays}); run the upgrade again")


def run_migrations_online() -> None:
    url = make_url(config.get_main_option("sqlalchemy.url") or "")
    connect_args = {} if "connect_timeout" in url.query else {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
    engine = create_engine(url, poolclass=pool.NullPool, connect_args=connect_args)
    with engine.connect() as connection:
        # Two processes starting at once (web and worker) must not both migrate.
        _lock(connection)
        _bound_lock_waits(connection)
        try:
            # A transaction per migration: each one's locks (ACCESS EXCLUSIVE on the tables it alters)
            # end with it. In one transaction for them all, a migration waiting for its table (a long
            # transaction on it, the shared subs_account the owner writes) held every table the ones
            # before it altered, subs_dunning and the webhooks' mirror tables among them, as long as it
            # waited. Each committed migration is a revision the next run starts from.
            context.configure(connection=connection, target_metadata=target_metadata, transaction_per_migration=True)
            with context.begin_transaction():
                context.run_migrations()
        except DBAPIError as exc:
            if getattr(exc.orig, "pgcode", None) != migrate.LOCK_NOT_AVAILABLE:
                _unlock_after_failure(connection)
                raise
            with contextlib.suppress(Exception):
                connection.rollback()
            blocked = _blocked(connection, exc)
            _unlock_after_failure(connection)
            raise blocked from None
        except BaseException:
            _unlock_after_failure(connection)
            raise
        connection.exec_driver_sql("SELECT pg_advisory_unlock(7281001)")
        connection.commit()


def _unlock_after_failure(connection: Connection) -> None:
    # The migration's own error is the one to raise: unlocking inside its aborted transaction
    # would fail with "current transaction is aborted" and hide it. A session lock outlives
    # the rollback; if even that fails, the connection's close (NullPool) frees the lock.
    with contextlib.suppress(Exception):
        connection.rollback()
        connection.exec_driver_sql("SELECT pg_advisory_unlock(7281001)")
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
