"""tasks.relay_outbox (beat, every few seconds) and tasks.deliver_account_outbox (one account)."""

from __future__ import annotations

import time
from typing import Any

import requests
from celery import Task, shared_task

from app.outbox.backlog import backlog
from app.outbox.relay import DELIVER_TASK, deliver_account, relay
from app.stuck_work import DEFERRED
from tasks.recompute import handle_failure
from tasks.runtime import runtime_for

# Seconds either task sends rows for before it leaves the rest to the next beat pass (checked between
# rows; a call in flight ends within its own timeouts). Without it, one account's backlog behind a slow
# Account Management held an outbox worker until the task's hard time limit.
RELAY_BUDGET_SECONDS = 20.0


@shared_task(name="tasks.relay_outbox", bind=True, ignore_result=True)
def relay_outbox(self: Task) -> dict[str, Any]:
    """Undelivered rows carry their own backoff (next_attempt_at); this task only fails (and retries
    by failure class) when the database itself does."""
    rt = runtime_for(self.app)
    try:
        # The wall clock, row by row.
        report = relay(rt.engine, rt.settings.account_management_url, budget_seconds=RELAY_BUDGET_SECONDS)
        with rt.engine.connect() as conn:
            stats = backlog(conn)  # also sets the backlog gauge
    except Exception as exc:
        handle_failure(self, exc, None, {})
        raise
    return {**report.to_json(), "backlog": stats["backlog"]}


@shared_task(name=DELIVER_TASK, bind=True, ignore_result=True)
def deliver_account_outbox(self: Task, account_id: str) -> dict[str, Any]:
    """One account's rows, in order, within the same budget as a beat pass: what is left then goes
    with tasks.relay_outbox (the account is ready as soon as its next row is). Its stuck rows are
    resolved by any later relay of the account that runs through, this task's or a beat pass's
    (app.outbox.relay.deliver_account)."""
    rt = runtime_for(self.app)
    deadline = time.monotonic() + RELAY_BUDGET_SECONDS
    base = rt.settings.account_management_url
    if not base:  # nothing relayed: a re-driven stuck row stays
        return {"account_id": account_id, "delivered": 0, DEFERRED: True}
    try:
        with requests.Session() as session:
            report = deliver_account(rt.engine, session, base, account_id, deadline=deadline)
    except Exception as exc:
        handle_failure(self, exc, account_id, {"account_id": account_id})
        raise
    # A run that did not go through the account's rows (cut short, or another relay holds the
    # account) leaves its stuck rows, a re-driven one included: its success alone would resolve it.
    return {"account_id": account_id, **report.to_json(), DEFERRED: account_id not in report.relayed}
