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
from collections import OrderedDict
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery import Task
from celery.signals import task_failure, task_retry
from sqlalchemy import Engine

from app.db import unit_of_work
from app.payments.bad_debt_settle import ACCOUNT as PAYMENT_ACCOUNT
from tasks.failures import PARK_REQUEST, FailureKind, account_of, count_failure, record_stuck
from tasks.recompute import NAME as RECOMPUTE
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
# A recompute killed for good is dead stuck work like one given up as dead in the task, whose request
# it parks (tasks.failures.PARK_REQUEST): else the stale-request re-drive sends it again every minute,
# to kill a child per run (the first and each retry) for ever. The request each killed run took was
# rolled back with it; the main process knows no version, so it parks the one pending now, once the
# last run died: that one, or one touched after it took it (a touch waits for the run's row lock).
PENDING_REQUEST = "SELECT touched_at FROM recompute_request WHERE account_id = %(account)s"


# Celery sends task_failure twice for a task killed at its hard time limit, both here: from
# Request.on_failure, with the task's request context (its retries), then from Request.on_timeout,
# with none. The first is recorded; the second would write its attempts as 1 and count it again.
# The ids of the tasks recorded lately, oldest first.
_reported: OrderedDict[str, None] = OrderedDict()
REPORTED_KEPT = 1000


def first_report(task_id: str | None) -> bool:
    if task_id is None:
        return True
    if task_id in _reported:
        return False
    _reported[task_id] = None
    if len(_reported) > REPORTED_KEPT:
        _reported.popitem(last=False)
    return True


@task_failure.connect
def _record_killed(sender: Task | None = None, task_id: str | None = None, exception: BaseException | None = None,
                   args: Any = None, kwargs: Any = None, **_: Any) -> None:
    if sender is None or not isinstance(exception, KILLED) or not first_report(task_id):
        return
    arguments = task_arguments(sender, args, kwargs)
    engine = runtime_for(sender.app).engine
    account = account_named(engine, arguments)
    attempts = int(getattr(sender.request, "retries", None) or 0) + 1
    error = f"{exception.__class__.__name__}: {exception} (task {task_id})"
    log.error("%s[%s] killed with its process (%s): recorded as dead stuck work", sender.name, task_id, error)
    taken = pending_request(engine, account) if sender.name == RECOMPUTE and account is not None else None
    # One row per task and arguments: a poison message is that message's, not its account's other work.
    record_stuck(engine, sender.name, arguments, account, FailureKind.KILLED, error, attempts, "dead", per_args=True)
    count_failure(sender.name, FailureKind.KILLED, "dead")
    if taken is not None and account is not None:
        park_request(engine, account, taken)


@task_retry.connect
def _count_lost_retry(sender: Task | None = None, reason: Any = None, **_: Any) -> None:
    if sender is not None and isinstance(getattr(reason, "exc", None), WorkerLostError):
        count_failure(sender.name, FailureKind.KILLED, "retry")


def pending_request(engine: Engine, account_id: str) -> datetime | None:
    """The touched_at of the account's pending recompute request, None when there is none."""
    try:
        with engine.connect() as conn:
            touched = conn.exec_driver_sql(PENDING_REQUEST, {"account": account_id}).scalar()
    except Exception:  # the database may be what failed: the request is then sent again, as before
        log.exception("could not read the recompute request of %s", account_id)
        return None
    return touched if isinstance(touched, datetime) else None


def park_request(engine: Engine, account_id: str, touched: datetime) -> None:
    """Park the request version a recompute killed for good found pending (see PENDING_REQUEST), if
    nobody touched it since. Apart from the dead row's transaction: a killed run's backend may still
    hold the request's row for a moment, and the row matters more than the parking."""
    try:
        with unit_of_work(engine) as conn:
            conn.exec_driver_sql(PARK_REQUEST, {"account": account_id, "touched": touched})
    except Exception:  # then the stale-request re-drive sends it again, as for a run not given up
        log.exception("could not park the recompute request of %s", account_id)


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
