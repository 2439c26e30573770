"""Celery beat schedule. Periodic work lives here; each entry names a stable task."""

from __future__ import annotations

from typing import Any

BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    # Requests stored but never queued (broker down at ingest), lost messages, and events whose
    # customer had no account yet.
    "redrive-recompute-requests": {"task": "tasks.redrive_requests", "schedule": 30.0},
    # Drift sweep (a sweep already running makes the next one exit at once) and the rollout gate.
    "drift-sweep": {"task": "tasks.drift_sweep", "schedule": 900.0, "options": {"expires": 600}},
    "check-rollout-gate": {"task": "tasks.check_rollout_gate", "schedule": 300.0, "options": {"expires": 240}},
}
