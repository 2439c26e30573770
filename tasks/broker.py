"""The Redis broker transport, with one redis-py client per channel instead of one per command.

kombu's Redis channel builds a new ``redis.Redis`` object for every publish; redis-py 8 fills a
dict of some 170 response callbacks in each constructor, which made that the largest CPU cost of
enqueueing a task (two publishes: the task and its task-sent event) and of every event a worker
sends. A client object is safe to share between threads (each command takes a connection from
the pool), so the channel keeps one per connection pool and builds a new one when kombu replaces
the pool after a reconnect. Everything else is kombu's own transport.
"""

from __future__ import annotations

from typing import Any

import kombu.transport
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _shared_client: Any = None
    _shared_client_pool: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        if self._shared_client is None or self._shared_client_pool is not pool:
            self._shared_client = super()._create_client(asynchronous=False)
            self._shared_client_pool = pool
        return self._shared_client


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    """Unchanged: listed so every Redis scheme has an explicit transport here."""


TRANSPORT = "tasks.broker:Transport"
SCHEMES = ("redis", "rediss")


def is_plain_redis(broker_url: str) -> bool:
    """A Redis broker this transport serves (not Sentinel, not a unix socket URL)."""
    return broker_url.startswith(tuple(f"{scheme}://" for scheme in SCHEMES))


def serve_redis_urls() -> None:
    """Make this transport the one kombu picks for redis:// and rediss:// URLs in this process.

    Not ``broker_transport``: a connection named by a transport's path calls itself by that path
    (``tasks.broker:Transport://host``), and Flower, which knows a Redis broker by its URL's scheme,
    answered its Broker page and queue lengths with 404 "broker is not supported". Under the scheme's
    own alias the URL stays redis://. kombu resolves an alias once per process (its cache), so the
    alias is replaced before any connection is made and the cache entry dropped in case one was."""
    for scheme in SCHEMES:
        kombu.transport.TRANSPORT_ALIASES[scheme] = TRANSPORT
        kombu.transport._transport_cache.pop(scheme, None)
