"""A task whose retry cannot be sent (the broker refuses the message at that moment) is not lost.
Celery answers a retry it could not publish with Reject(requeue=False): the worker drops the
message. The first failure writes no stuck row (only the second in a row does), so a support
button's recompute, which has no request row for beat to re-drive, was gone (DESIGN section 8:
a task that gives up is never dropped)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from celery import Task
from celery.canvas import Signature
from celery.exceptions import Reject
from kombu.exceptions import OperationalError as BrokerDown

from app.db import Conflict
from tasks.factory import make_celery
from tasks.failures import POLICIES, FailureKind

pytestmark = pytest.mark.worker


def run_as_worker(task: Task, args: list[Any], retries: int = 0) -> Any:
    """The task's body as the worker runs it (not eager: a retry is published)."""
    task.push_request(id=f"t-{task.name}-{retries}", args=args, kwargs={}, retries=retries, called_directly=False,
                      is_eager=False, delivery_info={"routing_key": "recompute"})
    try:
        return task.run(*args)
    finally:
        task.pop_request()


def stuck(engine, account: str) -> list[tuple[str, str, Any]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(
            "SELECT state, error_class, task_args FROM subs_stuck_events WHERE account_id = %(a)s", {"a": account})]


@pytest.fixture
def broker_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Signature, *args: Any, **kwargs: Any) -> Any:
        raise BrokerDown("Error 111 connecting to localhost:6379. Connection refused.")

    monkeypatch.setattr(Signature, "apply_async", refuse)


@pytest.fixture
def lock_contention(monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.recompute as recompute

    def busy(*args: Any, **kwargs: Any) -> None:
        raise Conflict("deadlock detected")

    monkeypatch.setattr(recompute, "run_recompute", busy)


def test_a_first_failure_whose_retry_is_not_sent_is_left_for_beat(celery_app, accounts, engine, lock_contention,
                                                                   broker_refuses):
    account, _ = accounts.create()
    task = celery_app.tasks["tasks.recompute_account"]
    with pytest.raises(Reject) as rejected:
        run_as_worker(task, [account, "NINJAPANEL_BUTTON", "support:ana"])
    assert stuck(engine, account) == [("retrying", FailureKind.LOCK_CONTENTION.value,
                                       {"account_id": account, "trigger": "NINJAPANEL_BUTTON", "cause": "support:ana"})]
    assert not rejected.value.requeue  # dropped by the worker: the row carries the work


def test_a_retry_not_sent_and_not_recorded_goes_back_on_the_queue(settings, accounts, lock_contention, broker_refuses):
    """Nowhere to record it either (the database down too): the message is requeued, not dropped."""
    app = make_celery(dataclasses.replace(settings, database_url="postgresql+psycopg2://postgres@127.0.0.1:1/dunning"))
    import tasks.recompute  # noqa: F401  (registers the task)

    task = app.tasks["tasks.recompute_account"]
    # a retry of its own, and one waiting for the database after its own retries
    for retries in (0, POLICIES[FailureKind.LOCK_CONTENTION].max_retries):
        with pytest.raises(Reject) as rejected:
            run_as_worker(task, ["acct-support", "NINJAPANEL_BUTTON", "support:ana"], retries=retries)
        assert rejected.value.requeue, retries


def failures_counted(task: str, kind: FailureKind, action: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("dunning_task_failures_total",
                                     {"task": task, "failure_class": kind.value, "action": action}) or 0.0


def test_a_failure_whose_retry_is_not_sent_counts_as_left_for_beat(celery_app, accounts, engine, lock_contention,
                                                                   broker_refuses):
    """dunning_task_failures_total's action says what became of the work: ``retry`` the task retries
    itself, ``retrying`` beat re-drives it. A retry the broker refused is not the task's own: its
    work is a retrying row for beat. It counted as ``retry``, so an alert on work left to beat
    missed it."""
    account, _ = accounts.create()
    task, kind = "tasks.recompute_account", FailureKind.LOCK_CONTENTION
    before = {action: failures_counted(task, kind, action) for action in ("retry", "retrying")}
    with pytest.raises(Reject):
        run_as_worker(celery_app.tasks[task], [account, "NINJAPANEL_BUTTON", "support:ana"])
    assert {action: failures_counted(task, kind, action) - n for action, n in before.items()} == \
        {"retry": 0, "retrying": 1}
