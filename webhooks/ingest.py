"""Ingest one verified event: store once, mirror, request a recompute, commit, then enqueue."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from celery import Celery
from sqlalchemy import Engine

from app.db import unit_of_work
from app.dispatch import BrokerUnavailable, enqueue_recompute
from app.payments import bad_debt_webhook
from webhooks import store
from webhooks.mirror import Extracted, extract

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


BAD_DEBT_PAYMENT_FOR_EVENT = """
SELECT 1 FROM bad_debt_payment
 WHERE account_id = %(account)s AND state = 'pending'
   AND (stripe_payment_intent_id = %(pi)s OR invoice_ids ? %(invoice)s)
"""


def _trigger(conn: Any, ex: Extracted, account_id: str) -> str:
    """The event's trigger; a success of the isolated bad-debt payment is BAD_DEBT_PAID."""
    assert ex.trigger is not None
    if ex.type in ("invoice.paid", "invoice.payment_succeeded", "payment_intent.succeeded", "invoice_payment.paid"):
        hit = conn.exec_driver_sql(BAD_DEBT_PAYMENT_FOR_EVENT, {
            "account": account_id, "pi": ex.payment_intent, "invoice": ex.invoice_id or "",
        }).first()
        if hit:
            return "BAD_DEBT_PAID"
    return ex.trigger.value


def ingest(engine: Engine, celery_app: Celery, event: dict[str, Any], raw: str) -> Ingested:
    ex = extract(event)  # raises NotAStripeEvent
    with unit_of_work(engine) as conn:
        stored = store.insert_event(conn, ex, raw)
        if stored is None:
            return Ingested(ex.event_id, ex.type, "duplicate")
        account_id, state = stored
        if state == "ignored":
            return Ingested(ex.event_id, ex.type, state)
        if state == "unroutable" or account_id is None:
            for row in ex.rows:
                store.upsert_row(conn, row)
            # Kept, visible, and re-driven by beat once subs_customer maps the customer.
            return Ingested(ex.event_id, ex.type, "unroutable")
        trigger = _trigger(conn, ex, account_id)
        # The isolated bad-debt payment's outcome (app/payments/bad_debt_webhook.py).
        settle = bad_debt_webhook.record_outcome(conn, ex.type, account_id, ex.payment_intent, event)
        created = store.request_recompute(conn, account_id, trigger, ex.event_id, ex.rows)
    if settle is not None:
        bad_debt_webhook.enqueue_settlement(celery_app, settle)
    if not created:
        return Ingested(ex.event_id, ex.type, state, account_id, coalesced=True)
    try:
        enqueue_recompute(celery_app, account_id, trigger, ex.event_id)
    except BrokerUnavailable as exc:
        # Accepted and committed: the pending request stays and beat re-drives it.
        log.warning("recompute for %s not queued, beat will re-drive: %s", account_id, exc)
        with unit_of_work(engine) as conn:
            conn.exec_driver_sql("UPDATE stripe_event SET state = 'enqueue_failed' WHERE id = %(id)s",
                                 {"id": ex.event_id})
        return Ingested(ex.event_id, ex.type, "enqueue_failed", account_id, enqueue_failed=True)
    return Ingested(ex.event_id, ex.type, state, account_id, enqueued=True)
