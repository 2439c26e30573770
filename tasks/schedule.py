"""Celery beat schedule. Periodic work lives here; each entry names a stable task."""

from __future__ import annotations

from typing import Any

BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    # Requests stored but never queued (broker down at ingest), lost messages, and events whose
    # customer had no account yet.
    # (Every tick expires: a tick that retries by its failure class, e.g. while the database is down,
    # is dropped once the next ticks have come, rather than piling up retries for as long as it lasts.)
    "redrive-recompute-requests": {"task": "tasks.redrive_requests", "schedule": 30.0, "options": {"expires": 25}},
    # Bad-debt payments charged but not settled (settlement never queued or lost).
    "settle-bad-debt-payments": {"task": "tasks.settle_unsettled_bad_debt_payments", "schedule": 60.0,
                                 "options": {"expires": 50}},
    # Bad-debt payments pending past the guard window with no outcome: Stripe is asked how they ended.
    "reconcile-bad-debt-payments": {"task": "tasks.reconcile_bad_debt_payments", "schedule": 120.0,
                                    "options": {"expires": 100}},
    # Due payment retries are rows (subs_dunning.next_retry_at), never long countdowns.
    "dispatch-due-retries": {"task": "tasks.dispatch_due_retries", "schedule": 30.0, "options": {"expires": 25}},
    # Failed invoices no webhook explained (no decline code) a few minutes on: Stripe is asked why.
    "fetch-attempt-detail": {"task": "tasks.fetch_attempt_detail", "schedule": 60.0, "options": {"expires": 50}},
    # Unpaid invoices whose event carried their first lines only (has_more): their whole list from Stripe.
    "fetch-invoice-lines": {"task": "tasks.fetch_invoice_lines", "schedule": 60.0, "options": {"expires": 50}},
    "relay-outbox": {"task": "tasks.relay_outbox", "schedule": 5.0, "options": {"expires": 20}},
    "redrive-stuck": {"task": "tasks.redrive_stuck", "schedule": 60.0, "options": {"expires": 50}},
    # Drift sweep (a sweep already running makes the next one exit at once) and the rollout gate.
    "drift-sweep": {"task": "tasks.drift_sweep", "schedule": 900.0, "options": {"expires": 600}},
    # Customers mapped (or moved) by other teams since: filed, the sweep reads their mirror rows by range.
    "refile-mirror": {"task": "tasks.refile_mirror", "schedule": 300.0, "options": {"expires": 240}},
    "check-rollout-gate": {"task": "tasks.check_rollout_gate", "schedule": 300.0, "options": {"expires": 240}},
    # History rows older than HISTORY_RETENTION_DAYS that nothing reads any more (app/history/prune.py).
    "prune-history": {"task": "tasks.prune_history", "schedule": 3600.0, "options": {"expires": 1800}},
}

# Nobody reads a tick's result: each is sent with ignore_result. Told to keep one, Celery's Redis
# result backend subscribes beat to the tick's result channel before the broker is tried (with Redis
# down, every tick waited out the backend's reconnection, about 20 s, before the broker's refusal),
# and beat, which never reads them, kept every subscription. Flower shows a tick's states and return
# value all the same (they come from the task events).
for _entry in BEAT_SCHEDULE.values():
    _entry["options"]["ignore_result"] = True
