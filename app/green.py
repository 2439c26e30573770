"""psycopg2 under gevent: the web process's waits on PostgreSQL yield to its other requests.

The Procfile runs the web process on gunicorn's gevent workers: every request is a greenlet, and
gevent's patched sockets make waits on Redis, Stripe and Account Management cooperative. psycopg2
is a C library with sockets of its own, so a query would block the whole worker, every request in
it, for as long as PostgreSQL takes (a lock wait, a WAL flush). psycopg2's documented hook for
coroutine libraries fixes that: with a wait callback set, it sends each query and hands the waiting
to the callback, which parks the greenlet until the socket is ready.

libpq enforces ``connect_timeout`` only when it does the waiting itself; with a wait callback the
callback must (a server that takes the TCP connection and never answers would otherwise hold the
request forever), so ``_wait`` does, with libpq's own error text.

A wait that does not finish (the greenlet killed, a gevent Timeout) makes psycopg2 close that
connection rather than leave it mid-statement, and the pool discards it: no later request gets a
connection in an unknown state.

Called from ``create_app()``, which a gevent worker runs after it has patched the process; in any
other process (tests, the Celery worker, a gthread worker) gevent has patched nothing and this does
nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from psycopg2 import OperationalError, extensions


def cooperate_if_gevent() -> bool:
    """Install the wait callback if gevent has patched this process; whether it did."""
    if "gevent.monkey" not in sys.modules:  # never imported gevent: nothing was patched
        return False
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        return False
    extensions.set_wait_callback(_wait)
    return True


def _wait(conn: Any) -> None:
    """psycopg2's wait callback: poll the connection, parking this greenlet until its socket is
    ready each time psycopg2 would block."""
    from gevent.socket import wait_read, wait_write

    deadline = _connect_deadline(conn)
    while True:
        state = conn.poll()
        if state == extensions.POLL_OK:
            return
        if state not in (extensions.POLL_READ, extensions.POLL_WRITE):
            raise OperationalError(f"psycopg2 poll() returned an unknown state: {state!r}")
        left = None if deadline is None else deadline - time.monotonic()
        try:
            if left is not None and left <= 0:
                raise TimeoutError
            (wait_read if state == extensions.POLL_READ else wait_write)(conn.fileno(), timeout=left)
        except TimeoutError:
            # psycopg2 closes the connection once this callback raises (see the module's docstring).
            raise OperationalError("timeout expired (connect_timeout)") from None


def _connect_deadline(conn: Any) -> float | None:
    """While connecting: when libpq's connect_timeout runs out (as libpq counts it: unset or 0 waits
    for ever, less than 2 means 2). Otherwise None: a statement's time is the server's to limit
    (statement_timeout)."""
    if conn.status != extensions.STATUS_SETUP:
        return None
    try:
        seconds = int(conn.info.dsn_parameters.get("connect_timeout") or 0)
    except ValueError:
        return None
    return time.monotonic() + max(seconds, 2) if seconds > 0 else None
