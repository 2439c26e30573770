"""Engine and unit-of-work factories. Nothing connects at import."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event


class DatabaseUnavailable(Exception):
    """The database could not be reached (connection refused, dropped, timed out), or refuses work
    for now (read only after a failover, out of disk, memory or connections: NOT_NOW_CODES)."""


class ValueRejected(ValueError):
    """The database, or its driver, refused a value: out of range, not valid text, a NUL character."""


class Conflict(Exception):
    """The statement lost to a concurrent one (deadlock, serialization failure) and was rolled back:
    running it again is safe and normally succeeds."""


class TimedOut(Conflict):
    """The statement waited on a lock past lock_timeout, or ran past statement_timeout, and was
    cancelled (rolled back). Running it again later is safe; at once, it would most likely wait as
    long again behind the same lock holder."""


class LockNotAvailable(TimedOut):
    """The statement waited on a lock past lock_timeout (contention: one holder, likely one account's),
    not a statement that ran past statement_timeout (a slow database: everything waits)."""


# How long a session's statement waits for a lock before it is cancelled (TimedOut); set on connect.
LOCK_TIMEOUT = "5s"

# SQLSTATEs of a statement cancelled for taking too long: lock_not_available (lock_timeout),
# query_canceled (statement_timeout, or a cancel request).
TIMED_OUT_CODES = ("55P03", "57014")
LOCK_NOT_AVAILABLE = "55P03"

# SQLSTATEs of a server that refuses work for now, not the statement's fault, answered as a database
# unreachable is (503, a retry later): read only (25006: a standby, or a primary demoted by a failover
# the client has not followed yet) and insufficient resources (class 53: disk full, out of memory, too
# many connections). The connection itself is fine.
NOT_NOW_CODES = ("25006",)
NOT_NOW_CLASSES = ("53",)


def refuses_for_now(pgcode: str | None) -> bool:
    """The server's SQLSTATE says "not now" (NOT_NOW_CODES): the same work later is expected to pass."""
    return pgcode is not None and (pgcode in NOT_NOW_CODES or pgcode.startswith(NOT_NOW_CLASSES))


def without_quoted_value(message: str) -> str:
    """PostgreSQL's message of a data exception (SQLSTATE class 22) quotes the value refused
    ('invalid input syntax for type integer: "<value>"'), a syntax error the token it stopped at,
    which is a value when the statement went wrong at a parameter (psycopg2 inlines them). For what
    ops and support see: everything from the first quote to the last goes, as PostgreSQL does not
    escape a quote inside the value."""
    return re.sub(r'".*"', '"..."', message, flags=re.DOTALL)


def is_timed_out(exc: BaseException) -> bool:
    """True when ``exc`` is a statement cancelled by lock_timeout or statement_timeout: TimedOut, or
    the driver's error (SQLAlchemy's wrapping it) that was not turned into one."""
    if isinstance(exc, TimedOut):
        return True
    return getattr(getattr(exc, "orig", exc), "pgcode", None) in TIMED_OUT_CODES


# libpq connection parameters every session gets unless DATABASE_URL's query sets them itself
# (connect_args would otherwise override the URL's). Socket options, set when connecting: no round
# trip, no cost per statement.
# - tcp_user_timeout (ms): data sent and left unacknowledged that long (a network cut in the middle of
#   a query, a host gone) ends the connection, instead of the kernel's retransmissions (about 15
#   minutes) holding the webhook group commit's leader, every request queued behind it, or a task.
# - keepalives_*: the client's own keepalives, for a cut while it waits for an answer with nothing
#   unacknowledged (the query sent, the server gone): probes after 30 s idle, and with
#   tcp_user_timeout set the kernel ends the connection once they go unanswered that long (the
#   server's keepalives, set on connect below, cover the other side).
CONNECT_DEFAULTS: dict[str, Any] = {"connect_timeout": 3, "application_name": "dunning", "tcp_user_timeout": 30_000,
                                    "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                                    "keepalives_count": 3}


def connect_args(database_url: str) -> dict[str, Any]:
    """CONNECT_DEFAULTS less what the URL's query sets (``?tcp_user_timeout=60000``): the URL wins."""
    from sqlalchemy.engine import make_url

    query = make_url(database_url).query
    return {name: value for name, value in CONNECT_DEFAULTS.items() if name not in query}


POOL_TIMEOUT = 5  # seconds a checkout waits for a free connection


def make_engine(database_url: str, **kwargs: Any) -> Engine:
    options: dict[str, Any] = {
        # No pre-ping: it costs a round trip on every checkout of the hot paths. A connection the
        # server dropped fails its statement instead: a 503 that Stripe redelivers on the webhook,
        # a classified retry in tasks; the pool then discards it (and pool_recycle ages them out).
        "pool_pre_ping": False,
        "pool_size": 5,
        "max_overflow": 5,
        "pool_recycle": 1800,
        # A request waiting for a free connection (a gevent web worker serves more at once than its
        # pool holds; the webhook group commit taking a new one) answers 503 after this, not the 30 s
        # of SQLAlchemy's default, by which time Stripe has given up on the delivery.
        "pool_timeout": POOL_TIMEOUT,
        "connect_args": connect_args(database_url),
    }
    options.update(kwargs)
    engine = create_engine(database_url, **options)
    _set_timeouts(engine)
    return engine


def _set_timeouts(engine: Engine) -> None:
    # A stuck lock or query must fail the task (and be retried by its failure policy) rather
    # than hold a worker forever; 10 s is far above any statement this product runs.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            # UTC: gather parses the ISO timestamps that to_json renders in the session zone.
            # force_generic_plan: only our own PREPAREd statements are affected (gather), whose
            # generic plan is as good as a custom one and saves re-planning on every call.
            # jit off: with a million accounts a generic plan's estimated cost passes jit_above_cost
            # and PostgreSQL compiled every execution (about 45 ms) for statements that run in 1 ms.
            # TCP keepalives on the server's side: a host that dies holding a session lock (a
            # settlement's, a retry's) or a transaction has its session ended within about a minute,
            # not the two hours of the kernel's default (ignored over a Unix socket).
            cur.execute(f"SET statement_timeout = '10s'; SET lock_timeout = '{LOCK_TIMEOUT}'; SET TIME ZONE 'UTC'; "
                        "SET plan_cache_mode = force_generic_plan; SET jit = off; "
                        "SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; "
                        "SET tcp_keepalives_count = 3")
        dbapi_conn.commit()

    # The webhook group commit runs its connection in psycopg2's autocommit (webhooks/ingest.py) and
    # turns it off when it gives it back. One given back some other way (its owner garbage collected)
    # would make every later unit of work on it commit statement by statement: no transaction, no
    # transaction-scoped lock. Every connection comes back to the pool in transaction mode.
    @event.listens_for(engine, "checkin")
    def _on_checkin(dbapi_conn: Any, _record: Any) -> None:
        if dbapi_conn is not None and getattr(dbapi_conn, "autocommit", False):
            with suppress(Exception):  # closed, or unusable: the pool discards it on its next use
                dbapi_conn.autocommit = False


@contextmanager
def unit_of_work(engine: Engine) -> Iterator[Connection]:
    """One transaction: commits only when the block ends normally, rolls back otherwise."""
    with engine.connect() as conn, conn.begin():
        yield conn


@contextmanager
def session_lock(engine: Engine, name: str) -> Iterator[bool]:
    """A PostgreSQL advisory lock named ``name``, held on a connection of its own for the block:
    yields whether it was taken (False: someone else holds it). Taken without waiting."""
    with engine.connect() as conn:
        try:
            got = bool(conn.exec_driver_sql("SELECT pg_try_advisory_lock(hashtextextended(%(n)s, 0))",
                                            {"n": name}).scalar())
            conn.commit()
        except BaseException:
            conn.invalidate()  # it may hold the lock: closed, not back to the pool holding it
            raise
        try:
            yield got
        finally:
            if got:
                try:
                    conn.exec_driver_sql("SELECT pg_advisory_unlock(hashtextextended(%(n)s, 0))", {"n": name})
                    conn.commit()
                except Exception:
                    # Closing the session releases the lock; the block's own outcome stands.
                    conn.invalidate()


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` means the database is unreachable rather than that the SQL is wrong."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    if isinstance(exc, DatabaseUnavailable):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if refuses_for_now(getattr(getattr(exc, "orig", exc), "pgcode", None)):  # SQLAlchemy's, or the driver's own
        return True
    if isinstance(exc, OperationalError):
        return _lost(exc.orig if exc.orig is not None else exc)
    return False


CONNECTION_MARKERS = ("could not connect", "connection refused", "server closed", "timeout expired",
                      "terminating connection", "could not translate host", "connection to server",
                      "connection already closed", "ssl syscall error", "eof detected")


# --- prepared statements for the hot paths -------------------------------------------------------
# psycopg2 sends plain SQL, so PostgreSQL plans every statement on every call; for the webhook and
# recompute statements planning costs as much as running them. A Prepared is PREPAREd once per
# connection (prepared statements live as long as the session, and survive a rollback) and then
# EXECUTEd with a generic plan (plan_cache_mode is set on connect). A generic plan is kept for the
# connection's life; made while a table is nearly empty it may scan the whole table, and keep doing
# so as it grows. These statements are all keyed lookups, so they run with sequential scans off
# for their transaction (one more statement in the same round trip).

KEYED_PLANS = "SET LOCAL enable_seqscan = off"

class Prepared:
    """A statement written with $1..$n placeholders, prepared once per database connection."""

    def __init__(self, name: str, sql: str, types: tuple[str, ...] = ()) -> None:
        self.name = name
        self.sql = sql
        self.types = types

    def ensure(self, conn: Connection) -> None:
        done: set[str] = conn.connection.info.setdefault("dunning_prepared", set())
        if self.name not in done:
            types = f"({', '.join(self.types)})" if self.types else ""
            conn.exec_driver_sql(f"PREPARE {self.name}{types} AS {self.sql}")
            done.add(self.name)

    def call(self, params: tuple[Any, ...]) -> str:
        return f"EXECUTE {self.name}({', '.join(['%s'] * len(params))})" if params else f"EXECUTE {self.name}"


def _batch(conn: Connection, calls: tuple[tuple[Prepared, tuple[Any, ...]], ...]) -> tuple[str, tuple[Any, ...]]:
    for statement, _ in calls:
        statement.ensure(conn)
    sql = "; ".join([KEYED_PLANS, *(statement.call(params) for statement, params in calls)])
    return sql, tuple(p for _, params in calls for p in params)


def execute_prepared(conn: Connection, *calls: tuple[Prepared, tuple[Any, ...]]) -> Any:
    """Run one or more prepared statements in a single round trip; the result is the last one's."""
    return conn.exec_driver_sql(*_batch(conn, calls))


def _dbapi_cursor(conn: Connection) -> Any:
    # SQLAlchemy must know a transaction is open (it begins one on its own executes only), so that
    # its commit or rollback ends the one psycopg2 opens for this cursor.
    if not conn.in_transaction():
        conn.begin()
    return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]


@contextmanager
def _dbapi_errors(conn: Connection) -> Iterator[None]:
    """What SQLAlchemy does for its own executes, for ours on the DBAPI cursor: a lost connection
    is taken out of the pool and reported as DatabaseUnavailable, as is a server refusing work for
    now (read only, out of resources: the connection is kept); a refused value is ValueRejected,
    a lost race Conflict, a wait past lock_timeout LockNotAvailable, a run past statement_timeout
    TimedOut."""
    import psycopg2
    import psycopg2.errors
    import psycopg2.extensions

    try:
        yield
    except psycopg2.DataError as exc:
        raise ValueRejected(str(exc).strip()) from exc
    except psycopg2.IntegrityError as exc:
        # A value missing where a column needs one, or breaking a check: the input's fault, like a
        # DataError. A unique violation is not (callers that expect one catch it themselves).
        if exc.pgcode in (NOT_NULL_VIOLATION, CHECK_VIOLATION):
            raise ValueRejected(str(exc).strip()) from exc
        raise
    except psycopg2.extensions.TransactionRollbackError as exc:
        raise Conflict(str(exc).strip()) from exc
    except psycopg2.errors.ProgramLimitExceeded as exc:
        # A value larger than an index entry holds (an id of kilobytes: "index row size exceeds btree
        # maximum"): the input's fault, as a DataError is. The statement was rolled back and the
        # connection is fine.
        raise ValueRejected(f"value cannot be stored, too large: {exc.diag.message_primary}") from exc
    except psycopg2.InternalError as exc:
        if refuses_for_now(exc.pgcode):  # read only (25006)
            raise DatabaseUnavailable(f"database refuses writes for now: SQLSTATE {exc.pgcode}") from exc
        raise
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        if exc.pgcode == LOCK_NOT_AVAILABLE:  # the server answered: the connection is fine
            raise LockNotAvailable(str(exc).strip()) from exc
        if exc.pgcode in TIMED_OUT_CODES:
            raise TimedOut(str(exc).strip()) from exc
        if refuses_for_now(exc.pgcode):  # out of disk, memory, connections (class 53): answered, fine
            raise DatabaseUnavailable(f"database out of resources for now: SQLSTATE {exc.pgcode}") from exc
        dbapi = conn.connection.driver_connection
        if isinstance(exc, psycopg2.InterfaceError) or getattr(dbapi, "closed", False) or _lost(exc):
            conn.invalidate(exc)
            raise DatabaseUnavailable(f"database connection lost: {exc.__class__.__name__}") from exc
        raise
    except ValueError as exc:  # psycopg2 adapting a parameter (a string with a NUL character)
        raise ValueRejected(str(exc)) from exc


NOT_NULL_VIOLATION, CHECK_VIOLATION = "23502", "23514"


def commit_dbapi(conn: Connection) -> None:
    """Commit the transaction psycopg2 runs on ``conn``'s driver connection, its errors named as
    fetch_prepared_* names them: a connection lost on the way (the COMMIT sent, its answer never
    read: committed or not, no one knows) is DatabaseUnavailable, and the connection is invalidated."""
    with _dbapi_errors(conn):
        conn.connection.driver_connection.commit()  # type: ignore[union-attr]


def _lost(exc: BaseException) -> bool:
    """The driver's message says the connection is gone."""
    message = str(exc).lower()
    return any(m in message for m in CONNECTION_MARKERS)


def fetch_prepared_row(conn: Connection, *calls: tuple[Prepared, tuple[Any, ...]]) -> tuple[Any, ...] | None:
    """execute_prepared's first row of the last result, through the DBAPI cursor: on the hot paths
    SQLAlchemy's result machinery cost about as much CPU as the statement."""
    sql, params = _batch(conn, calls)
    with _dbapi_errors(conn), _dbapi_cursor(conn) as cursor:
        cursor.execute(sql, params)
        row: tuple[Any, ...] | None = cursor.fetchone()
        return row


def fetch_prepared_all(conn: Connection, *calls: tuple[Prepared, tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """fetch_prepared_row for every row."""
    sql, params = _batch(conn, calls)
    with _dbapi_errors(conn), _dbapi_cursor(conn) as cursor:
        cursor.execute(sql, params)
        rows: list[tuple[Any, ...]] = cursor.fetchall()
        return rows
