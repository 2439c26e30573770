"""tasks.recompute_account: the one handler for every trigger."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Reject, Retry

from app.recompute.observe import observe, observe_failure
from app.recompute.service import run_recompute
from tasks.failures import (
    MAX_COUNTDOWN,
    PASSING,
    POLICIES,
    classify,
    count_failure,
    describe,
    record_stuck,
    resolve_stuck,
)
from tasks.runtime import runtime_for

log = logging.getLogger(__name__)

NAME = "tasks.recompute_account"


def handle_failure(task: Task, exc: Exception, account_id: str | None, args: dict[str, Any],
                   per_args: bool = False, taken_request: datetime | None = None, dead: bool = False) -> None:
    """Retry by failure class, or give up into subs_stuck_events (one row per account, or per
    account and ``args`` with ``per_args``); counted in dunning_task_failures_total either way.
    ``taken_request``: the touched_at of the account's recompute request the failed run had taken;
    a give-up as dead parks it, if nobody touched it since (tasks.failures.PARK_REQUEST). ``dead``:
    given up as dead whatever its class (its work is over, a re-drive would do nothing). Always
    raises."""
    kind = classify(exc)
    policy = POLICIES[kind]
    retries = task.request.retries
    engine = runtime_for(task.app).engine
    error = describe(exc)  # what the stuck row shows: no statement's values (the log below has the whole error)
    if policy.retry and retries < policy.max_retries:
        if retries >= 1:  # a second failure in a row becomes visible while it keeps retrying
            record_stuck(engine, task.name, args, account_id, kind, error, retries + 1, "retrying",
                         per_args=per_args)
        countdown = policy.countdown(retries, getattr(exc, "retry_after", None))
        log.warning("%s for %s failed (%s), retry %d in %.1fs", task.name, account_id, kind, retries + 1, countdown)
        try:
            raise task.retry(exc=exc, countdown=countdown, max_retries=policy.max_retries)
        except Retry:
            count_failure(task.name, kind, "retry")
            raise
        except Reject as not_sent:
            # Celery could not publish the retry (the broker refused it) and has the worker drop this
            # message: the work is kept as a retrying row for beat to re-drive (the first failure has
            # none yet), or, with nowhere to write one either, the message goes back on the queue.
            recorded = record_stuck(engine, task.name, args, account_id, kind, error, retries + 1, "retrying",
                                    per_args=per_args)
            # Left for beat: not a retry of the task's own (requeued, it is one all the same).
            count_failure(task.name, kind, "retrying" if recorded else "retry")
            log.error("%s for %s: its retry was not sent (%s): %s", task.name, account_id, not_sent.reason,
                      "left for beat" if recorded else "requeued")
            raise Reject(not_sent.reason, requeue=not recorded) from exc
    # Its own retries are over. A passing failure (a database outage longer than the backoff) stays
    # "retrying": beat re-drives it until it succeeds. What will not heal by waiting (invalid data, a
    # refused API call, an unexpected error) is "dead", for an operator.
    state = "retrying" if kind in PASSING and not dead else "dead"
    if not record_stuck(engine, task.name, args, account_id, kind, error, retries + 1, state, per_args=per_args,
                        park_request=taken_request if state == "dead" else None):
        # Nowhere to record the give-up (the database is down, or refuses the row for a reason that
        # does not pass: record_stuck logged it at CRITICAL). Raising now would have the message
        # acknowledged (a task that raises is acked, late ack or not) with no row to show or re-drive
        # the work; the task keeps retrying at the longest countdown until the database answers.
        count_failure(task.name, kind, "retry")
        log.error("%s for %s gave up its own retries (%s) and could not record it: retrying in %ds",
                  task.name, account_id, kind, MAX_COUNTDOWN)
        try:
            raise task.retry(exc=exc, countdown=MAX_COUNTDOWN, max_retries=retries + 1)  # (None: the task's default)
        except Reject as not_sent:  # nor could the retry be sent (the broker): the message goes back on the queue
            raise Reject(not_sent.reason, requeue=True) from exc
    count_failure(task.name, kind, state)
    log.error("%s for %s gave up its own retries (%s, %s): %s: %s", task.name, account_id, kind, state,
              exc.__class__.__name__, exc)
    raise exc


@shared_task(name=NAME, bind=True)
def recompute_account(self: Task, account_id: str, trigger: str = "STATE_REFRESH", cause: str | None = None,
                      coalesced: bool = False) -> dict[str, Any]:
    rt = runtime_for(self.app)
    taken: list[datetime] = []
    try:
        # No clock here: run_recompute reads it once it holds the account's lock.
        result = run_recompute(rt.engine, rt.policy, account_id, trigger, coalesced=coalesced, taken=taken)
    except Exception as exc:
        observe_failure(trigger)
        handle_failure(self, exc, account_id, {"account_id": account_id, "trigger": trigger, "cause": cause},
                       taken_request=taken[0] if taken else None)
        raise  # handle_failure always raises; this keeps type checkers honest
    observe(result)
    if self.request.retries:
        resolve_stuck(rt.engine, NAME, account_id)
    if self.request.ignore_result:
        # Nobody reads it (webhook and sweep sends): skip serialising the reasons.
        return {"account_id": account_id, "trigger": trigger, "outcome": result.outcome}
    summary = result.summary()
    summary["cause"] = cause
    return summary
