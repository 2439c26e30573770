"""How the sweep remediates: a DRIFT_DETECTED recompute on the queue (the recompute task stays the
only writer of dunning state). Forced, not coalesced: the sweep wants a run even when no webhook
request is pending."""

from __future__ import annotations

from celery import Celery

from app.dispatch import enqueue_recompute
from app.domain.triggers import Trigger
from app.sweep.sweep import Enqueue


def celery_enqueuer(celery_app: Celery) -> Enqueue:
    def enqueue(account_id: str, run_id: int | None) -> str:
        return enqueue_recompute(celery_app, account_id, Trigger.DRIFT_DETECTED.value, cause=f"drift_sweep:{run_id}",
                                 coalesced=False)

    return enqueue
