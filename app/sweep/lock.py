"""One sweep at a time: a PostgreSQL session advisory lock, taken with try-lock.

The lock lives on a connection of its own for as long as the sweep (or one chained segment of it)
runs. It is released explicitly before the connection goes back to the pool; if taking or releasing it
fails, the connection is invalidated so the lock dies with the session.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine

# An arbitrary constant: the advisory-lock key space is shared with per-account locks, which use
# hashtextextended(account_id, 7281); a collision would only delay a recompute, never corrupt it.
SWEEP_LOCK_KEY = 0x5EEB_D21F7


class SweepBusy(Exception):
    """Another sweep is running; this one did nothing. ``run_id``: the sweep found 'running' while
    no segment of it held the lock (between two segments, or its segment's worker lost); None when
    the lock itself was taken. ``unchained``: that sweep's next segment is known not sent (the broker
    refused it): nothing carries it on unless this caller does."""

    def __init__(self, message: str, run_id: int | None = None, unchained: bool = False) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.unchained = unchained


@contextmanager
def sweep_lock(engine: Engine) -> Iterator[None]:
    conn = engine.connect()
    try:
        try:
            got = conn.exec_driver_sql("SELECT pg_try_advisory_lock(%(k)s)", {"k": SWEEP_LOCK_KEY}).scalar_one()
            conn.commit()
        except BaseException:
            # Interrupted after the server may have granted it (the task's soft time limit): closed,
            # not back to the pool holding it, where every later sweep would find the lock taken.
            conn.invalidate()
            raise
        if not got:
            raise SweepBusy("another drift sweep holds the sweep lock; not starting a second one")
        failing = False
        try:
            yield
        except BaseException:
            failing = True
            raise
        finally:
            try:
                conn.exec_driver_sql("SELECT pg_advisory_unlock(%(k)s)", {"k": SWEEP_LOCK_KEY})
                conn.commit()
            except Exception:
                conn.invalidate()
                # The sweep's own failure (a database blip it is to be retried on, a bug) is the one
                # that goes on, not the unlock's: the lock went with the invalidated session anyway.
                if not failing:
                    raise
    finally:
        conn.close()
