"""Attempt detail from Stripe's API, for a failed invoice whose failure no webhook explained.

An invoice.payment_failed says that a payment failed, not why: the decline code comes with
charge.failed / payment_intent.payment_failed (DESIGN section 2). Until one of them arrives, compute
reads the failure as ``unknown``, retried like a transient one with a smaller budget, so an expired
or stolen card would be charged again. When that detail never comes (an endpoint not subscribed to
those events, a delivery Stripe gave up on), beat asks Stripe, once per failure, a few minutes
after it:

* the invoice's payments (``GET /v1/invoice_payments?invoice=``), newest first: the payment intents
  that tried to pay it;
* the newest of them that failed (``GET /v1/payment_intents/<id>``) is mirrored as its
  payment_intent.payment_failed would have been, linked to the invoice and timed at the invoice's
  failure, through the webhook mirror's own code and ordering guard (an event that comes later
  about the same intent still merges in);
* the account's recompute is requested in the same transaction, and queued after the commit.

A failure Stripe shows no failed intent for (paid since, or no intent made) is asked about once. A
Stripe error leaves the invoice for the next pass; a rate limit ends the pass there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import stripe
from celery import Celery

from app import metrics
from app.db import unit_of_work
from app.dispatch import BrokerUnavailable, enqueue_recompute
from app.domain.triggers import Trigger
from app.payments.bad_debt_settle import mirror_rows
from app.payments.stripe_client import make_stripe_client
from app.runtime import Runtime

log = logging.getLogger(__name__)

# Webhooks about one failure arrive within seconds; Stripe's own redeliveries take longer, but
# asking then costs two API calls, and the later event still merges in.
GRACE = timedelta(minutes=10)
# Failures older than this are not asked about (the first pass after deploying would otherwise walk
# every old open invoice): Stripe's own retries of an invoice stop within a month.
HORIZON = timedelta(days=30)
# The newest payments of an invoice looked at: the failure asked about is its latest.
PAYMENTS_LISTED = 10
INTENTS_RETRIEVED = 2

# Open invoices whose latest failure has no failed attempt in the mirror from that moment on (linked
# to the invoice, or unlinked and of its customer, as charge.failed is since API 2025-03-31) and
# was not asked about yet: claimed for one ask each.
CLAIM = """
UPDATE stripe_invoice SET detail_asked_for = last_failed_at
 WHERE id IN (
    SELECT i.id FROM stripe_invoice i
     WHERE i.status = 'open' AND i.last_failed_at IS NOT NULL
       AND i.last_failed_at < %(before)s AND i.last_failed_at >= %(since)s
       AND i.detail_asked_for IS DISTINCT FROM i.last_failed_at
       AND NOT EXISTS (
           SELECT 1 FROM stripe_payment_attempt a
            WHERE a.status = 'failed'
              AND (a.invoice_id = i.id OR (a.invoice_id IS NULL AND a.stripe_customer_id = i.stripe_customer_id))
              AND GREATEST(a.attempted_at, a.failed_at) >= i.last_failed_at - interval '1 minute')
     ORDER BY i.last_failed_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
RETURNING id, stripe_customer_id, last_failed_at
"""
# Asked, and Stripe did not answer: the next pass asks again.
UNCLAIM = "UPDATE stripe_invoice SET detail_asked_for = NULL WHERE id = %(id)s AND detail_asked_for = %(at)s"
ACCOUNT_OF = "SELECT account_id FROM subs_customer WHERE stripe_customer_id = %(customer)s"


@dataclass
class DetailReport:
    asked: int = 0
    found: list[str] = field(default_factory=list)  # invoices whose failure was explained
    none: int = 0  # Stripe shows no failed intent for the failure
    errors: int = 0  # left for the next pass

    def to_json(self) -> dict[str, Any]:
        return {"asked": self.asked, "found": len(self.found), "none": self.none, "errors": self.errors}


def fetch_missing_detail(rt: Runtime, celery_app: Celery, now: datetime, limit: int = 50) -> DetailReport:
    """One pass: ask Stripe about up to ``limit`` unexplained failures. Raises database errors."""
    report = DetailReport()
    with unit_of_work(rt.engine) as conn:
        window = {"before": now - GRACE, "since": now - HORIZON, "limit": limit}
        claimed = conn.exec_driver_sql(CLAIM, window).fetchall()
    if not claimed:
        return report
    client = make_stripe_client(rt.settings)
    for n, (invoice_id, customer, failed_at) in enumerate(claimed):
        report.asked += 1
        try:
            intent = _failed_intent(client, invoice_id)
        except stripe.StripeError as exc:
            # Asked again next pass; after a rate limit, so are the ones not asked yet.
            rate_limited = isinstance(exc, stripe.RateLimitError)
            _unclaim(rt, claimed[n:] if rate_limited else claimed[n:n + 1])
            report.errors += 1
            metrics.ATTEMPT_DETAIL.labels("error").inc()
            log.warning("Stripe did not give the attempt detail of invoice %s (%s)%s", invoice_id,
                        exc.__class__.__name__, "; rate limited, the pass ends" if rate_limited else "")
            if rate_limited:
                break
            continue
        if intent is None:
            report.none += 1
            metrics.ATTEMPT_DETAIL.labels("none").inc()
            continue
        _record(rt, celery_app, invoice_id, customer, failed_at, intent)
        report.found.append(invoice_id)
        metrics.ATTEMPT_DETAIL.labels("found").inc()
    return report


def _unclaim(rt: Runtime, claimed: Sequence[Any]) -> None:
    with unit_of_work(rt.engine) as conn:
        for invoice_id, _customer, failed_at in claimed:
            conn.exec_driver_sql(UNCLAIM, {"id": invoice_id, "at": failed_at})


def _failed_intent(client: stripe.StripeClient, invoice_id: str) -> dict[str, Any] | None:
    """The newest payment intent of the invoice that failed, as Stripe has it now; None if none did."""
    listed = client.v1.invoice_payments.list({"invoice": invoice_id, "limit": PAYMENTS_LISTED})
    payments = sorted((p.to_dict() for p in listed.data), key=lambda p: int(p.get("created") or 0), reverse=True)
    intents = [pi for p in payments
               if isinstance(p.get("payment"), dict) and p["payment"].get("type") == "payment_intent"
               and isinstance(pi := p["payment"].get("payment_intent"), str) and pi]
    for pi in intents[:INTENTS_RETRIEVED]:
        intent: dict[str, Any] = client.v1.payment_intents.retrieve(pi).to_dict()
        if intent.get("status") == "requires_payment_method" and isinstance(intent.get("last_payment_error"), dict):
            return intent
    return None


def _record(rt: Runtime, celery_app: Celery, invoice_id: str, customer: str, failed_at: datetime,
            intent: dict[str, Any]) -> None:
    """Mirror the intent as its payment_failed event would be, and request the account's recompute."""
    from webhooks.store import request_recompute, upsert_row

    trigger, cause = Trigger.PAYMENT_FAILED.value, f"stripe_api:{intent['id']}"
    with unit_of_work(rt.engine) as conn:
        for row in mirror_rows("payment_intent.payment_failed", "stripe_api", intent,
                               created=int(failed_at.timestamp())):
            row.values["invoice_id"] = invoice_id  # the link Stripe's intent no longer carries
            row.values["stripe_customer_id"] = row.values.get("stripe_customer_id") or customer
            upsert_row(conn, row)
        account = conn.exec_driver_sql(ACCOUNT_OF, {"customer": customer}).scalar()
        created = account is not None and request_recompute(conn, account, trigger, cause)
    log.info("attempt detail of invoice %s from Stripe: %s, %s", invoice_id, intent["id"],
             (intent.get("last_payment_error") or {}).get("decline_code") or "no decline code")
    if created:
        try:
            enqueue_recompute(celery_app, str(account), trigger, cause)
        except BrokerUnavailable as exc:  # the request row stays: the stale-request re-drive sends it
            log.warning("recompute of %s not queued, beat will re-drive it: %s", account, exc)
