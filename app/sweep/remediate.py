"""How the sweep remediates: a DRIFT_DETECTED recompute on the queue (the recompute task stays the
only writer of dunning state). The sweep stores the account's recompute request first (sweep.py
_remediate); the task is sent coalesced, as every producer's is: it runs if it takes that request,
and a lost message is sent again by beat's stale-request re-drive."""

from __future__ import annotations

from celery import Celery

from app.dispatch import enqueue_recompute
from app.sweep.sweep import REMEDIATION_TRIGGER, Enqueue, remediation_cause


def celery_enqueuer(celery_app: Celery) -> Enqueue:
    def enqueue(account_id: str, run_id: int | None) -> str:
        return enqueue_recompute(celery_app, account_id, REMEDIATION_TRIGGER, cause=remediation_cause(run_id),
                                 coalesced=True)

    return enqueue
