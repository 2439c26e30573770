"""The re-drive tick ends where Celery's soft time limit finds it, in the routing too.

Since 4faf800 the routing of unroutable events runs in its own transaction and its failure is raised
only once the stale-request and due-review re-drives of the tick are done. Celery's soft time limit
(SoftTimeLimitExceeded, an Exception raised in the main thread by a signal) is no failure of the
routing: the task's time is up, and the hard limit (10 s later) kills the worker process whatever it
is doing then. Caught as one, the tick went on reading the due reviews and stale requests and sending
recomputes to the broker past the soft limit, into the hard one.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import Engine, event

from app.redrive import redrive
from tests.conftest import Accounts
from tests.integration.test_redrive_routing_bounded import a_stale_request_and_a_due_review
from tests.integration.test_webhook_ingest import count, queued


def test_the_soft_time_limit_during_the_routing_ends_the_tick_there(
        accounts: Accounts, engine: Engine, settings, celery_app) -> None:
    _stale, due_account = a_stale_request_and_a_due_review(accounts, engine)

    def soft_time_limit(_signum: int, _frame: Any) -> None:
        raise SoftTimeLimitExceeded()  # as billiard's handler in a prefork child

    def time_is_up_in_the_routing(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "redrive_cursor" in statement:  # the routing's first statement
            signal.raise_signal(signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, soft_time_limit)
    event.listen(engine, "before_cursor_execute", time_is_up_in_the_routing)
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            redrive(engine, celery_app)
    finally:
        event.remove(engine, "before_cursor_execute", time_is_up_in_the_routing)
        signal.signal(signal.SIGUSR1, previous)

    assert queued(settings) == 0  # nothing sent once the task's time was up
    assert count(engine, "SELECT count(*) FROM recompute_request WHERE account_id = %(a)s", a=due_account) == 0
    # The next tick (beat's) does it all.
    redrive(engine, celery_app)
    assert queued(settings) == 2
