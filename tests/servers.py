"""Which real servers the tests use: the ones the environment names, else PostgreSQL and Redis
on their standard local ports when they answer and let us in, else private ones started from
Python packages.

A developer's own PostgreSQL often answers on 5432 but asks a password of ``postgres`` over TCP
(Debian's and Ubuntu's default); such a server is passed over, with a line saying why, rather
than failing every test."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from app.config import normalize_database_url


def reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _postgres_answers(url: str) -> None:
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    finally:
        engine.dispose()


def _redis_answers(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    finally:
        client.close()


def _usable(url: str, check: Callable[[str], None]) -> bool:
    """Whether the server at ``url`` takes our connection; if not, warn why."""
    try:
        check(url)
    except Exception as exc:  # auth refused, not a PostgreSQL/Redis, ...: any reason means no
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        # A warning, so that pytest lists it in its summary (printed output of a passing run is not shown).
        warnings.warn(f"{make_url(url).render_as_string()} answers but cannot be used ({reason}); "
                      "using a private server instead", stacklevel=2)
        return False
    return True


@contextmanager
def postgres_admin_url() -> Iterator[str]:
    url = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if url:
        yield normalize_database_url(url)
        return
    local = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
    if reachable("127.0.0.1", 5432) and _usable(local, _postgres_answers):
        yield local
        return
    from app.embedded import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="dunning-test-pg-") as tmp:
        server = EmbeddedPostgres(Path(tmp))
        try:
            yield normalize_database_url(server.start())
        finally:
            server.stop()


@contextmanager
def test_database(admin_url: str) -> Iterator[str]:
    """A fresh database of our own, dropped afterwards (other work may share the server)."""
    name = f"dunning_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@contextmanager
def redis_url() -> Iterator[str]:
    url = os.environ.get("TEST_BROKER_URL") or os.environ.get("CELERY_BROKER_URL") or os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    local = "redis://127.0.0.1:6379/0"
    if reachable("127.0.0.1", 6379) and _usable(local, _redis_answers):
        yield local
        return
    from app.embedded import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="dunning-test-redis-") as tmp:
        server = EmbeddedRedis(Path(tmp))
        try:
            yield server.start()
        finally:
            server.stop()
