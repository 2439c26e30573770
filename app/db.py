"""Engine and unit-of-work factories. Nothing connects at import."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event


class DatabaseUnavailable(Exception):
    """The database could not be reached (connection refused, dropped, timed out)."""


def make_engine(database_url: str, **kwargs: Any) -> Engine:
    options: dict[str, Any] = {
        "pool_pre_ping": True,
        "pool_size": 5,
        "max_overflow": 5,
        "pool_recycle": 1800,
        "connect_args": {"connect_timeout": 3, "application_name": "dunning"},
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
            cur.execute("SET statement_timeout = '10s'; SET lock_timeout = '5s'; SET TIME ZONE 'UTC'; "
                        "SET plan_cache_mode = force_generic_plan")
        dbapi_conn.commit()


@contextmanager
def unit_of_work(engine: Engine) -> Iterator[Connection]:
    """One transaction: commits only when the block ends normally, rolls back otherwise."""
    with engine.connect() as conn, conn.begin():
        yield conn


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` means the database is unreachable rather than that the SQL is wrong."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    if isinstance(exc, DatabaseUnavailable):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError):
        message = str(exc.orig) if exc.orig is not None else str(exc)
        markers = ("could not connect", "connection refused", "server closed", "timeout expired",
                   "terminating connection", "could not translate host", "connection to server")
        return any(m in message.lower() for m in markers)
    return False
