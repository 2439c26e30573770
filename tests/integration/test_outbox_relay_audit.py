"""The outbox relay, audited: its advisory locks never stay behind on a pooled connection."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, suppress
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import Engine, event

from app.db import make_engine
from app.outbox.relay import account_lock, pass_lock

LOCKS: dict[str, Callable[[Engine], AbstractContextManager[bool]]] = {
    "account": lambda engine: account_lock(engine, "acct_lock_audit"),
    "pass": pass_lock,
}


@pytest.fixture
def locking(database_url: str) -> Iterator[Engine]:
    """One worker's engine: a pool of one connection, as a prefork child keeps it between tasks."""
    engine = make_engine(database_url, pool_size=1, max_overflow=0)
    try:
        yield engine
    finally:
        engine.dispose()


def _interrupt(when: str, statement_part: str) -> Callable[..., None]:
    def interrupt(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement_part in statement:
            raise SoftTimeLimitExceeded()
    interrupt.__name__ = f"interrupt_{when}"
    return interrupt


@pytest.mark.parametrize("lock", sorted(LOCKS))
@pytest.mark.parametrize("when, statement_part", [
    # The task's soft time limit lands in the release: the unlock never reached the server.
    ("before_cursor_execute", "pg_advisory_unlock"),
    # It lands right after the server granted the lock, before the relay knew it had it.
    ("after_cursor_execute", "pg_try_advisory_lock"),
])
def test_a_relay_lock_interrupted_is_not_kept_on_a_pooled_connection(locking, engine, lock, when, statement_part):
    """The relay's locks are session locks: a connection given back to the pool still holding one
    (a rollback does not release it) kept the account's rows, or every relay pass of the fleet, from
    every other worker until that worker's connection was recycled (30 min) or the worker stopped:
    another pass found it 'busy' each time and the whole outbox stood still."""
    interrupt = _interrupt(when, statement_part)
    event.listen(locking, when, interrupt)
    try:
        with suppress(SoftTimeLimitExceeded), LOCKS[lock](locking):
            pass
    finally:
        event.remove(locking, when, interrupt)
    with LOCKS[lock](engine) as elsewhere:  # another worker's session
        assert elsewhere, "the lock stayed held on the interrupted worker's pooled connection"
    with LOCKS[lock](locking) as again:  # and the interrupted worker takes it again too
        assert again

