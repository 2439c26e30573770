"""The sweep lock never stays behind on a pooled connection: a sweep interrupted while it takes or
releases its lock (the task's soft time limit) leaves the lock to the next sweep."""

from __future__ import annotations

from contextlib import suppress
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import Engine, event

from app.sweep.lock import SweepBusy, sweep_lock
from tests.conftest import wait_for


def _free(engine: Engine) -> bool:
    try:
        with sweep_lock(engine):
            return True
    except SweepBusy:
        return False


@pytest.mark.parametrize(("when", "statement_part"), [
    # The soft time limit lands right after the server granted the lock, before the sweep knew it had it.
    ("after_cursor_execute", "pg_try_advisory_lock"),
    # It lands in the release: the unlock never reached the server.
    ("before_cursor_execute", "pg_advisory_unlock"),
])
def test_a_sweep_lock_interrupted_is_not_kept_on_a_pooled_connection(locking, engine, when, statement_part):
    """A connection given back to the pool still holding the session lock (a rollback does not
    release it) made every later sweep of the fleet 'busy' until that worker's connection was
    recycled or the worker stopped: no drift was found or remediated meanwhile."""
    def interrupt(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement_part in statement:
            raise SoftTimeLimitExceeded()

    event.listen(locking, when, interrupt)
    try:
        with suppress(SoftTimeLimitExceeded), sweep_lock(locking):
            pass
    finally:
        event.remove(locking, when, interrupt)
    # Another worker's session takes it once the interrupted session has ended (closing a connection
    # does not wait for its server process to go), and so does the interrupted worker.
    wait_for(lambda: _free(engine), message="the sweep lock to be free for another worker")
    assert _free(locking)
