"""tasks.relay_outbox (beat, every few seconds) and tasks.deliver_account_outbox (one account)."""

from __future__ import annotations

from typing import Any

import requests
from celery import Task, shared_task

from app.outbox.backlog import backlog
from app.outbox.relay import deliver_account, relay
from tasks.recompute import handle_failure
from tasks.runtime import runtime_for


@shared_task(name="tasks.relay_outbox", bind=True, ignore_result=True)
def relay_outbox(self: Task) -> dict[str, Any]:
    """Undelivered rows carry their own backoff (next_attempt_at); this task only fails (and retries
    by failure class) when the database itself does."""
    rt = runtime_for(self.app)
    try:
        report = relay(rt.engine, rt.settings.account_management_url)  # the wall clock, row by row
        with rt.engine.connect() as conn:
            stats = backlog(conn)  # also sets the backlog gauge
    except Exception as exc:
        handle_failure(self, exc, None, {})
        raise
    return {**report.to_json(), "backlog": stats["backlog"]}


@shared_task(name="tasks.deliver_account_outbox", bind=True, ignore_result=True)
def deliver_account_outbox(self: Task, account_id: str) -> dict[str, Any]:
    rt = runtime_for(self.app)
    base = rt.settings.account_management_url
    if not base:
        return {"account_id": account_id, "delivered": 0}
    try:
        with requests.Session() as session:
            report = deliver_account(rt.engine, session, base, account_id)
    except Exception as exc:
        handle_failure(self, exc, account_id, {"account_id": account_id})
        raise
    return {"account_id": account_id, **report.to_json()}
