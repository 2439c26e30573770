"""tasks.prune_history (beat, hourly, queue maintenance): history rows older than HISTORY_RETENTION_DAYS
that nothing reads any more are removed (app/history/prune.py), within half the soft time limit."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task

from app.config import task_time_limits
from app.history.prune import prune
from tasks.failures import resolve_stuck
from tasks.recompute import handle_failure
from tasks.runtime import runtime_for

log = logging.getLogger(__name__)

NAME = "tasks.prune_history"


@shared_task(name=NAME, bind=True, ignore_result=True)
def prune_history(self: Task) -> dict[str, Any]:
    rt = runtime_for(self.app)
    # Half the soft limit, as a sweep segment: the batch running when it is spent (at most the 10 s
    # statement timeout) ends far inside the limit. What is left goes at the next run.
    budget = task_time_limits(rt.settings.visibility_timeout)[1] / 2
    try:
        report = prune(rt.engine, rt.policy, rt.settings.history_retention_days, budget_seconds=budget)
    except Exception as exc:
        handle_failure(self, exc, None, {})
        raise
    if self.request.retries:
        resolve_stuck(rt.engine, NAME, None)
    if report.skipped:
        log.info("history not pruned: %s", report.skipped)
    elif any(report.removed.values()) or not report.finished:
        log.info("history older than %d days pruned%s: %s", report.retention_days,
                 "" if report.finished else " (time budget spent, the rest goes next run)", report.removed)
    return report.to_json()
