"""Which real servers the tests use: the ones the environment names, else PostgreSQL and Redis
on their standard local ports when reachable, else private ones started from Python packages."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
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


@contextmanager
def postgres_admin_url() -> Iterator[str]:
    url = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if url:
        yield normalize_database_url(url)
        return
    if reachable("127.0.0.1", 5432):
        yield "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
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
    if reachable("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/0"
        return
    from app.embedded import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="dunning-test-redis-") as tmp:
        server = EmbeddedRedis(Path(tmp))
        try:
            yield server.start()
        finally:
            server.stop()
