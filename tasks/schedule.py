"""Celery beat schedule. Periodic work lives here; each entry names a stable task."""

from __future__ import annotations

from typing import Any

BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    # Requests stored but never queued (broker down at ingest), lost messages, and events whose
    # customer had no account yet.
    "redrive-recompute-requests": {"task": "tasks.redrive_requests", "schedule": 30.0},
}
