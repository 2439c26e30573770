"""tasks.redrive_requests (beat): queue accepted work that is not on a queue."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from app.redrive import redrive
from tasks.recompute import handle_failure
from tasks.runtime import runtime_for


@shared_task(name="tasks.redrive_requests", bind=True, ignore_result=True)
def redrive_requests(self: Task) -> dict[str, Any]:
    try:
        return redrive(runtime_for(self.app).engine, self.app)
    except Exception as exc:  # by failure class, as every beat task (a tick given up: a row its next tick resolves)
        handle_failure(self, exc, None, {})
        raise
