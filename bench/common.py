"""What every benchmark needs: real servers chosen like the tests do, a temporary migrated
database and a Redis key prefix of its own, both removed afterwards."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from app.migrate import upgrade  # noqa: E402
from tests import servers  # noqa: E402


@dataclass(frozen=True)
class BenchServers:
    database_url: str
    broker_url: str
    key_prefix: str


@contextmanager
def bench_servers() -> Iterator[BenchServers]:
    prefix = f"dunning-bench-{uuid.uuid4().hex[:8]}:"
    with servers.postgres_admin_url() as admin, servers.test_database(admin) as db_url, \
            servers.redis_url() as broker:
        upgrade(db_url)
        try:
            yield BenchServers(db_url, broker, prefix)
        finally:
            client = redis.Redis.from_url(broker)
            for key in client.scan_iter(match=prefix + "*", count=1000):
                client.delete(key)
            client.close()
