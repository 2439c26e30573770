"""tasks.redrive_stuck (beat): send again the stuck work whose re-drive time came; a re-driven task
that succeeds resolves its row (task_success below, by the row id carried in the task id), and a beat
task's tick that succeeds resolves the rows its earlier ticks left (under no account, no arguments)."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from celery.signals import task_success

from app.stuck_work import DEFERRED, counts, mark_resolved, redrive_due, resolve_beat_task, stuck_id_of
from tasks.recompute import handle_failure
from tasks.runtime import runtime_for
from tasks.schedule import BEAT_SCHEDULE

log = logging.getLogger(__name__)

BEAT_TASKS = frozenset(entry["task"] for entry in BEAT_SCHEDULE.values())


@shared_task(name="tasks.redrive_stuck", bind=True, ignore_result=True)
def redrive_stuck(self: Task) -> dict[str, Any]:
    rt = runtime_for(self.app)
    try:
        report = redrive_due(rt.engine, self.app)
        with rt.engine.connect() as conn:
            report.update(counts(conn))  # also sets the stuck-events gauges
    except Exception as exc:
        handle_failure(self, exc, None, {})
        raise
    return report


@task_success.connect
def _resolve_redriven(sender: Task | None = None, result: Any = None, **_: Any) -> None:
    if sender is None or (isinstance(result, dict) and result.get(DEFERRED)):
        return
    stuck_id = stuck_id_of(getattr(sender.request, "id", None))
    if stuck_id is not None:
        mark_resolved(runtime_for(sender.app).engine, stuck_id)
    elif sender.name in BEAT_TASKS and not getattr(sender.request, "args", None) \
            and not getattr(sender.request, "kwargs", None):
        # A beat tick that succeeded did the work its earlier given-up tick had to do. Only beat's
        # tasks: tasks.noop, the canary and the benchmarks' baseline, runs without arguments too.
        try:
            resolve_beat_task(runtime_for(sender.app).engine, sender.name)
        except Exception:  # the database went away after the task's work: the next tick resolves it
            log.warning("could not resolve the stuck rows of %s", sender.name, exc_info=True)
