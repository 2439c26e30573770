"""A give-up whose stuck row the database refuses for a reason that does not pass (not the
database down or busy: a refused permission, a table or column missing mid-deploy, an account id
PostgreSQL cannot take) is not "recorded" (DESIGN section 8: a task that gives up is never dropped).
record_stuck answered recorded for any such failure: the task gave up, its message was acknowledged,
and the work was gone with no row to show or re-drive it. It is kept retrying at the longest
countdown instead, as when the database is down, and logged at CRITICAL. An account id PostgreSQL
cannot take is no such refusal: no account by it can exist, so its give-up is filed under no account,
naming the id escaped, rather than retried every minute for ever."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Task
from celery.canvas import Signature
from celery.exceptions import Reject, Retry
from kombu.exceptions import OperationalError as BrokerDown
from sqlalchemy import Engine

from app.db import Conflict
from tasks.failures import MAX_COUNTDOWN

pytestmark = pytest.mark.worker

# PostgreSQL's text takes no NUL: no account can have this id
NUL_ACCOUNT = "acct-\x00-nul"
MISSING = "acct-refused-missing"


@pytest.fixture
def stuck_table_missing(engine: Engine) -> Iterator[None]:
    """subs_stuck_events gone, as mid-deploy (UndefinedTable: a failure that does not pass by itself)."""
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE subs_stuck_events RENAME TO subs_stuck_events_away")
    try:
        yield
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE subs_stuck_events_away RENAME TO subs_stuck_events")


def run_as_worker(task: Task, args: list[Any], eager: bool, retries: int = 0) -> Any:
    """The task's body as the worker runs it; ``eager``: a retry raises Retry without publishing."""
    task.push_request(id=f"t-refused-{task.name}-{retries}", args=args, kwargs={}, retries=retries,
                      called_directly=False, is_eager=eager, delivery_info={"routing_key": "recompute"})
    try:
        return task.run(*args)
    finally:
        task.pop_request()


def test_a_give_up_the_database_refuses_to_record_keeps_retrying_not_dropped(celery_app, caplog,
                                                                             stuck_table_missing):
    """A recompute failing on its last retry (the table missing mid-deploy: unexpected, its retries
    over) gives up as dead, and its dead row cannot be written either (the same table: a failure
    that does not pass). It raised its error as recorded: acknowledged, dropped. It retries at the
    longest countdown (not hot), logged loudly."""
    import tasks.recompute  # noqa: F401  (registers the task)

    task = celery_app.tasks["tasks.recompute_account"]
    with caplog.at_level(logging.ERROR, logger="tasks.failures"), pytest.raises(Retry) as kept:
        run_as_worker(task, [MISSING, "NINJAPANEL_BUTTON", "support:ana"], eager=True, retries=3)
    assert kept.value.when == MAX_COUNTDOWN
    assert any(r.levelno == logging.CRITICAL and "could not record stuck work" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_retry_not_sent_whose_row_the_database_refuses_goes_back_on_the_queue(celery_app, monkeypatch,
                                                                               stuck_table_missing):
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
        run_as_worker(celery_app.tasks["tasks.recompute_account"], [MISSING, "NINJAPANEL_BUTTON", "support:ana"],
                      eager=False)
    assert rejected.value.requeue


def test_a_give_up_for_an_account_id_no_row_can_hold_is_filed_under_no_account(celery_app, engine: Engine, clean):
    """A recompute sent by hand (Flower's API) for an id holding a NUL: no account by it can exist, and
    no row can hold it. Its give-up retried every minute for ever; it is recorded dead under no
    account, the id named escaped, and the task ends."""
    import tasks.recompute  # noqa: F401  (registers the task)

    task = celery_app.tasks["tasks.recompute_account"]
    with pytest.raises(Exception) as ended:
        run_as_worker(task, [NUL_ACCOUNT, "NINJAPANEL_BUTTON", "support:ana"], eager=True)
    assert not isinstance(ended.value, Retry)
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT account_id, state, error FROM subs_stuck_events "
            "WHERE task_name = 'tasks.recompute_account' AND task_args->>'account_id' = %(id)s",
            {"id": "acct-\\x00-nul"}).all()
    assert [(r[0], r[1]) for r in rows] == [(None, "dead")]
    assert "acct-\\x00-nul" in rows[0][2]
