"""A give-up whose stuck row the database refuses for a reason that does not pass (not the
database down or busy: a refused permission, a table or column missing mid-deploy, an account id
PostgreSQL cannot take) is not "recorded" (DESIGN section 8: a task that gives up is never dropped).
record_stuck answered recorded for any such failure: the task gave up, its message was acknowledged,
and the work was gone with no row to show or re-drive it. It is kept retrying at the longest
countdown instead, as when the database is down, and logged at CRITICAL."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from celery import Task
from celery.canvas import Signature
from celery.exceptions import Reject, Retry
from kombu.exceptions import OperationalError as BrokerDown

from app.db import Conflict
from tasks.failures import MAX_COUNTDOWN

pytestmark = pytest.mark.worker

# PostgreSQL's text takes no NUL: no row can be written under this account id, whatever its error
NUL_ACCOUNT = "acct-\x00-nul"


def run_as_worker(task: Task, args: list[Any], eager: bool, retries: int = 0) -> Any:
    """The task's body as the worker runs it; ``eager``: a retry raises Retry without publishing."""
    task.push_request(id=f"t-refused-{task.name}-{retries}", args=args, kwargs={}, retries=retries,
                      called_directly=False, is_eager=eager, delivery_info={"routing_key": "recompute"})
    try:
        return task.run(*args)
    finally:
        task.pop_request()


def test_a_give_up_the_database_refuses_to_record_keeps_retrying_not_dropped(celery_app, caplog):
    """A recompute of an account id holding a NUL fails on invalid data (dead), and its dead row
    cannot be written either (ValueError from the driver: invalid data, a failure that does not
    pass). It raised its error as recorded: acknowledged, dropped. It retries at the longest
    countdown (not hot), logged loudly."""
    import tasks.recompute  # noqa: F401  (registers the task)

    task = celery_app.tasks["tasks.recompute_account"]
    with caplog.at_level(logging.ERROR, logger="tasks.failures"), pytest.raises(Retry) as kept:
        run_as_worker(task, [NUL_ACCOUNT, "NINJAPANEL_BUTTON", "support:ana"], eager=True)
    assert kept.value.when == MAX_COUNTDOWN
    assert any(r.levelno == logging.CRITICAL and "could not record stuck work" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_retry_not_sent_whose_row_the_database_refuses_goes_back_on_the_queue(celery_app, monkeypatch):
    """Lock contention whose retry the broker refused: the work is kept as a retrying row for beat,
    and the message dropped. With the row refused too, the message was dropped all the same (no row,
    no message): it goes back on the queue."""
    import tasks.recompute as recompute

    def busy(*args: Any, **kwargs: Any) -> None:
        raise Conflict("deadlock detected")

    def refuse(self: Signature, *args: Any, **kwargs: Any) -> Any:
        raise BrokerDown("Error 111 connecting to localhost:6379. Connection refused.")

    monkeypatch.setattr(recompute, "run_recompute", busy)
    monkeypatch.setattr(Signature, "apply_async", refuse)
    with pytest.raises(Reject) as rejected:
        run_as_worker(celery_app.tasks["tasks.recompute_account"], [NUL_ACCOUNT, "NINJAPANEL_BUTTON", "support:ana"],
                      eager=False)
    assert rejected.value.requeue
