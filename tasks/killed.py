"""Tasks whose process died under them: a pool child lost (out of memory, a crash) or killed at the
hard time limit. Their own failure handling never ran (tasks.failures.handle_failure runs inside
the task), so the worker's main process records them here.

A lost child's task is sent again as a retry (``task_retry_on_worker_lost``, tasks/factory.py), a
few times: a message that kills every child that runs it would otherwise come back for ever,
taking a child down each time, and be seen nowhere. Once those retries are over, or at the hard
time limit, Celery fails the task; it becomes a ``dead`` stuck row for an operator, who can re-drive
it once the cause is fixed (DESIGN section 8: a task that gives up is never dropped).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery import Task
from celery.signals import task_failure, task_retry
from sqlalchemy import Engine

from app.payments.bad_debt_settle import ACCOUNT as PAYMENT_ACCOUNT
from tasks.failures import FailureKind, account_of, count_failure, record_stuck
from tasks.runtime import runtime_for

log = logging.getLogger(__name__)

KILLED = (WorkerLostError, TimeLimitExceeded)
# Tasks that work on a payment, not an account: their rows go under the payment's account, as their
# own failure handling files them (tasks/bad_debt.py, tasks/payments.py), so that support sees them
# on the account's page and the run that later succeeds resolves them (it resolves under the account).
ACCOUNT_BY_ARGUMENT = {
    "payment_id": PAYMENT_ACCOUNT,  # the bad-debt payment's tasks
    "retry_id": "SELECT account_id FROM payment_retry WHERE id = %(id)s",  # tasks.retry_payment
}


@task_failure.connect
def _record_killed(sender: Task | None = None, task_id: str | None = None, exception: BaseException | None = None,
                   args: Any = None, kwargs: Any = None, **_: Any) -> None:
    if sender is None or not isinstance(exception, KILLED):
        return
    arguments = task_arguments(sender, args, kwargs)
    engine = runtime_for(sender.app).engine
    account = account_named(engine, arguments)
    attempts = int(getattr(sender.request, "retries", None) or 0) + 1
    error = f"{exception.__class__.__name__}: {exception} (task {task_id})"
    log.error("%s[%s] killed with its process (%s): recorded as dead stuck work", sender.name, task_id, error)
    # One row per task and arguments: a poison message is that message's, not its account's other work.
    record_stuck(engine, sender.name, arguments, account, FailureKind.KILLED, error, attempts, "dead", per_args=True)
    count_failure(sender.name, FailureKind.KILLED, "dead")


@task_retry.connect
def _count_lost_retry(sender: Task | None = None, reason: Any = None, **_: Any) -> None:
    if sender is not None and isinstance(getattr(reason, "exc", None), WorkerLostError):
        count_failure(sender.name, FailureKind.KILLED, "retry")


def account_named(engine: Engine, arguments: Mapping[str, Any]) -> str | None:
    """The account the task works on: its ``account_id``, else the account of the payment it names."""
    account = arguments.get("account_id")
    if isinstance(account, str):
        return account
    for name, query in ACCOUNT_BY_ARGUMENT.items():
        if name in arguments:
            return account_of(engine, query, arguments[name])
    return None


def task_arguments(task: Task, args: Any, kwargs: Any) -> dict[str, Any]:
    """The call's arguments by name, as a stuck row keeps them (a re-drive sends them as keywords)."""
    args, kwargs = list(args or ()), dict(kwargs or {})
    try:
        return dict(inspect.signature(task.run).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):  # arguments the task does not take: kept as they came
        return {**kwargs, **({"args": args} if args else {})}
