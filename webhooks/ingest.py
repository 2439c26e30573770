"""Ingest one verified event: store once, mirror, request a recompute, commit, then enqueue."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from celery import Celery
from sqlalchemy import Engine

from app.db import autocommit, unit_of_work
from app.dispatch import BrokerUnavailable, enqueue_recompute
from app.payments import bad_debt_webhook
from webhooks import store
from webhooks.mirror import extract

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ingested:
    event_id: str
    type: str
    state: str  # accepted | unroutable | ignored | duplicate
    account_id: str | None = None
    enqueued: bool = False
    coalesced: bool = False
    enqueue_failed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"received": True, "id": self.event_id, "type": self.type, "state": self.state,
                "account_id": self.account_id, "enqueued": self.enqueued, "coalesced": self.coalesced}


def ingest(engine: Engine, celery_app: Celery, event: dict[str, Any], raw: str) -> Ingested:
    ex = extract(event)  # raises NotAStripeEvent
    settle = None
    if bad_debt_webhook.concerns(ex.type, ex.payment_intent):
        # The isolated bad-debt payment's outcome commits with the event (app/payments/bad_debt_webhook.py).
        with unit_of_work(engine) as conn:
            stored = store.ingest_event(conn, ex, raw)
            if stored is not None and stored.state == "accepted" and stored.account_id is not None:
                settle = bad_debt_webhook.record_outcome(conn, ex.type, stored.account_id, ex.payment_intent, event)
    else:
        # Every other event is one statement, atomic on its own: one round trip, no BEGIN/COMMIT.
        with autocommit(engine) as conn:
            stored = store.ingest_event(conn, ex, raw)
    if stored is None:
        return Ingested(ex.event_id, ex.type, "duplicate")
    if stored.state != "accepted" or stored.account_id is None:
        # ignored: nothing to act on. unroutable: kept with its mirror row, visible, and re-driven
        # by beat once subs_customer maps the customer.
        return Ingested(ex.event_id, ex.type, stored.state)
    account_id = stored.account_id
    if settle is not None:
        bad_debt_webhook.enqueue_settlement(celery_app, settle)
    if not stored.created or stored.trigger is None:
        return Ingested(ex.event_id, ex.type, stored.state, account_id, coalesced=True)
    try:
        enqueue_recompute(celery_app, account_id, stored.trigger, ex.event_id)
    except BrokerUnavailable as exc:
        # Accepted and committed: the pending request stays and beat re-drives it.
        log.warning("recompute for %s not queued, beat will re-drive: %s", account_id, exc)
        with unit_of_work(engine) as conn:
            conn.exec_driver_sql("UPDATE stripe_event SET state = 'enqueue_failed' WHERE id = %(id)s",
                                 {"id": ex.event_id})
        return Ingested(ex.event_id, ex.type, "enqueue_failed", account_id, enqueue_failed=True)
    return Ingested(ex.event_id, ex.type, stored.state, account_id, enqueued=True)
