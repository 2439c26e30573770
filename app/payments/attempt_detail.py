"""Attempt detail from Stripe's API, for a failed invoice whose failure no webhook explained.

An invoice.payment_failed says that a payment failed, not why: the decline code comes with
charge.failed / payment_intent.payment_failed (DESIGN section 2). Until one of them arrives, compute
reads the failure as ``unknown``, retried like a transient one with a smaller budget, so an expired
or stolen card would be charged again. When that detail never comes (an endpoint not subscribed to
those events, a delivery Stripe gave up on), beat asks Stripe, once per failure, a few minutes
after it:

* the invoice's payments (``GET /v1/invoice_payments?invoice=``), newest first: the payment intents
  that tried to pay it;
* the newest of them (``GET /v1/payment_intents/<id>``), when it failed or waits for the customer's
  authentication, is mirrored as its payment_intent.payment_failed / requires_action would have
  been, linked to the invoice and timed at the invoice's failure, through the webhook mirror's own
  code and ordering guard (an event that comes later about the same intent still merges in);
* the account's recompute is requested in the same transaction, and queued after the commit.

A failure is marked asked only once Stripe has answered about it, in the transaction that records
what it said, so a pass that stops half-way (its time limit, a database error) leaves the rest for
the next one. A failure Stripe shows no failed intent for (paid since, or no intent made), or
answers with a permanent error (an invoice it does not know), is asked about once. A passing
error (no answer, a 5xx) leaves it for the next pass; a rate limit or a key Stripe refuses ends
the pass (a rate limit's Retry-After holds the next passes back, app/payments/stripe_pass.py). One
pass at a time (an advisory lock), within a time budget.
"""

from __future__ import annotations

import logging
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
from app.payments.stripe_pass import ENDS_PASS, about_the_invoice, pause_after, run_pass
from app.runtime import Runtime
from tasks.failures import FailureKind, classify

log = logging.getLogger(__name__)

# Webhooks about one failure arrive within seconds; Stripe's own redeliveries take longer, but
# asking then costs two API calls, and the later event still merges in.
GRACE = timedelta(minutes=10)
# Failures older than this are not asked about (the first pass after deploying would otherwise walk
# every old open invoice): Stripe's own retries of an invoice stop within a month.
HORIZON = timedelta(days=30)
# The newest payments of an invoice looked at: the failure asked about is its latest, and the newest
# intent is the one that made it (an older one's failure, mirrored at this failure's time, would be
# filed at the wrong moment).
PAYMENTS_LISTED = 10
# What the newest intent says about the failure: a decline (the issuer's, or a failed 3-D Secure), or
# an off-session renewal the issuer wants the customer to authenticate (Stripe moves the intent to
# requires_action with invoice.payment_failed): the event each would have come with.
ANSWERS = {"requires_payment_method": "payment_intent.payment_failed",
           "requires_action": "payment_intent.requires_action"}

# Open invoices whose latest failure has no failed attempt (or one awaiting the customer's authentication)
# in the mirror from that moment on and was
# not asked about yet. An attempt explains the failure when it is linked to the invoice, or, unlinked
# (charge.failed names no invoice since API 2025-03-31), when it is of the invoice's customer and
# amount and no other invoice of the customer with that amount failed at the same moment (two
# subscriptions at one price renewing together, open or paid since: which one it was is Stripe's to say).
DUE = """
SELECT i.id, i.stripe_customer_id, i.last_failed_at FROM stripe_invoice i
 WHERE i.status = 'open' AND i.last_failed_at IS NOT NULL
   AND i.last_failed_at < %(before)s AND i.last_failed_at >= %(since)s
   AND i.detail_asked_for IS DISTINCT FROM i.last_failed_at
   AND NOT EXISTS (
       SELECT 1 FROM stripe_payment_attempt a
        WHERE a.status IN ('failed', 'requires_action')  -- a decline, or a renewal awaiting 3-D Secure
          AND GREATEST(a.attempted_at, a.failed_at) >= i.last_failed_at - interval '1 minute'
          AND (a.invoice_id = i.id
               OR (a.invoice_id IS NULL AND a.stripe_customer_id = i.stripe_customer_id
                   AND a.amount IN (i.amount_due, i.amount_remaining)
                   -- at that moment: one a minute or more later is another invoice's (this one's own
                   -- next attempt would have moved its last_failed_at)
                   AND GREATEST(a.attempted_at, a.failed_at) <= i.last_failed_at + interval '1 minute'
                   AND NOT EXISTS (
                       SELECT 1 FROM stripe_invoice j
                        WHERE j.stripe_customer_id = i.stripe_customer_id AND j.id <> i.id
                          AND a.amount IN (j.amount_due, j.amount_remaining)  -- paid since or not
                          AND j.last_failed_at BETWEEN i.last_failed_at - interval '1 minute'
                                                   AND i.last_failed_at + interval '1 minute'))))
 ORDER BY i.last_failed_at LIMIT %(limit)s
"""
# The intent's row in the mirror when it has the failed charge already, and the invoice it is linked
# to: linked to this one, the failure is an older one (the later failure made no new attempt); not
# linked (charge.failed names no invoice), it is this failure's, and Stripe's answer links it.
KNOWN_CHARGE = "SELECT invoice_id FROM stripe_payment_attempt WHERE id = %(intent)s AND charges ? %(charge)s"
LINK = "UPDATE stripe_payment_attempt SET invoice_id = %(invoice)s WHERE id = %(intent)s AND invoice_id IS NULL"
# Asked about this failure (a newer failure of the invoice is asked about again).
MARK_ASKED = "UPDATE stripe_invoice SET detail_asked_for = %(at)s WHERE id = %(id)s"
LOCK = "attempt_detail"
ACCOUNT_OF = "SELECT account_id FROM subs_customer WHERE stripe_customer_id = %(customer)s"


@dataclass
class DetailReport:
    asked: int = 0
    found: list[str] = field(default_factory=list)  # invoices whose failure was explained
    none: int = 0  # Stripe shows no failed intent for the failure
    errors: int = 0  # Stripe did not say
    busy: bool = False  # another pass was running
    paused: bool = False  # a rate limit's Retry-After held the pass back (app/payments/stripe_pass.py)

    def to_json(self) -> dict[str, Any]:
        return {"asked": self.asked, "found": len(self.found), "none": self.none, "errors": self.errors,
                "busy": self.busy, "paused": self.paused}


def fetch_missing_detail(rt: Runtime, celery_app: Celery, now: datetime, limit: int = 50,
                         budget_seconds: float = 30.0) -> DetailReport:
    """One pass: ask Stripe about up to ``limit`` unexplained failures, starting none after
    ``budget_seconds``. Raises database errors."""
    report = DetailReport()
    outcome = run_pass(
        rt, LOCK,
        lambda conn: conn.exec_driver_sql(DUE, {"before": now - GRACE, "since": now - HORIZON,
                                                "limit": limit}).fetchall(),
        lambda client, row: _ask(rt, celery_app, client, row[0], row[1], row[2], report), budget_seconds)
    report.busy, report.paused = outcome == "busy", outcome == "paused"
    return report


def _ask(rt: Runtime, celery_app: Celery, client: stripe.StripeClient, invoice_id: str, customer: str,
         failed_at: datetime, report: DetailReport) -> bool:
    """Ask Stripe about one failure and record what it said; False when the pass must end."""
    report.asked += 1
    try:
        intent = _failed_intent(client, invoice_id)
    except stripe.StripeError as exc:
        report.errors += 1
        metrics.ATTEMPT_DETAIL.labels("error").inc()
        ends = isinstance(exc, ENDS_PASS)
        pause = pause_after(rt, LOCK, exc) if ends else None
        log.warning("Stripe did not give the attempt detail of invoice %s (%s)%s%s", invoice_id,
                    exc.__class__.__name__, "; the pass ends" if ends else "",
                    f", none before {pause:.0f} s (Retry-After)" if pause is not None else "")
        if about_the_invoice(exc):  # not asked again
            _record(rt, celery_app, invoice_id, customer, failed_at, None)
        return not ends
    try:
        known = _known_failure(rt, intent) if intent is not None else None
        if known is not None and known.linked_to == invoice_id:
            intent = None  # an older failure, already filed here: nothing new
        _record(rt, celery_app, invoice_id, customer, failed_at, intent, link_only=known is not None)
    except Exception as exc:
        # An answer the mirror cannot store (a value the database refuses, a shape it cannot read)
        # costs this failure only: asked about once, as an invoice Stripe does not know. Raised, it
        # failed the whole pass, and the oldest failure is asked about first at every pass: none
        # behind it was ever explained. The database's own failures (and bugs) are the pass's.
        if classify(exc) is not FailureKind.INVALID_DATA:
            raise
        report.errors += 1
        metrics.ATTEMPT_DETAIL.labels("error").inc()
        log.exception("the attempt detail of invoice %s from Stripe could not be stored: not asked again; "
                      "the pass goes on", invoice_id)
        _record(rt, celery_app, invoice_id, customer, failed_at, None)
        return True
    if intent is None:
        report.none += 1
    else:
        report.found.append(invoice_id)
    metrics.ATTEMPT_DETAIL.labels("none" if intent is None else "found").inc()
    return True


def _failed_intent(client: stripe.StripeClient, invoice_id: str) -> dict[str, Any] | None:
    """The invoice's newest payment intent as Stripe has it now, when it failed or waits for the
    customer's authentication; None otherwise."""
    listed = client.v1.invoice_payments.list({"invoice": invoice_id, "limit": PAYMENTS_LISTED})
    payments = sorted((p.to_dict() for p in listed.data), key=lambda p: int(p.get("created") or 0), reverse=True)
    newest = next((pi for p in payments
                   if isinstance(p.get("payment"), dict) and p["payment"].get("type") == "payment_intent"
                   and isinstance(pi := p["payment"].get("payment_intent"), str) and pi), None)
    if newest is None:
        return None
    intent: dict[str, Any] = client.v1.payment_intents.retrieve(newest).to_dict()
    status = intent.get("status")
    if status == "requires_payment_method" and not isinstance(intent.get("last_payment_error"), dict):
        return None  # waiting for a method with no failure said: nothing to learn
    return intent if status in ANSWERS else None


@dataclass(frozen=True)
class KnownFailure:
    linked_to: str | None  # the invoice the mirrored attempt is linked to, if any


def _known_failure(rt: Runtime, intent: dict[str, Any]) -> KnownFailure | None:
    """The mirror's record of the intent's failed charge, if it has it."""
    error = intent.get("last_payment_error") or {}
    charge = error.get("charge") if isinstance(error.get("charge"), str) else None
    if not charge:
        return None  # a failure that made no charge (3-D Secure) is timed by the failure asked about
    with rt.engine.connect() as conn:
        row = conn.exec_driver_sql(KNOWN_CHARGE, {"intent": intent["id"], "charge": charge}).first()
    return None if row is None else KnownFailure(row[0])


def _record(rt: Runtime, celery_app: Celery, invoice_id: str, customer: str, failed_at: datetime,
            intent: dict[str, Any] | None, link_only: bool = False) -> None:
    """Mark the failure asked about and, with a failed intent, mirror it as its payment_failed event
    would be (``link_only``: the mirror has it, unlinked; only the link to the invoice is new, its
    times stay) and request the account's recompute; queued after the commit."""
    from webhooks.store import request_recompute, upsert_row

    trigger = Trigger.PAYMENT_FAILED.value
    cause = f"stripe_api:{intent['id']}" if intent is not None else None
    created = False
    account = None
    with unit_of_work(rt.engine) as conn:
        if intent is not None:
            # The request row first, then the mirror rows: the order webhook ingest locks them in (the
            # other order deadlocked with a webhook of the invoice arriving meanwhile).
            account = conn.exec_driver_sql(ACCOUNT_OF, {"customer": customer}).scalar()
            created = account is not None and request_recompute(conn, account, trigger, cause)
        conn.exec_driver_sql(MARK_ASKED, {"id": invoice_id, "at": failed_at})
        if intent is None:
            return
        if link_only:
            conn.exec_driver_sql(LINK, {"invoice": invoice_id, "intent": intent["id"]})
        else:
            for row in mirror_rows(ANSWERS[str(intent["status"])], "stripe_api", intent,
                                   created=int(failed_at.timestamp())):
                row.values["invoice_id"] = invoice_id  # the link Stripe's intent no longer carries
                row.values["stripe_customer_id"] = row.values.get("stripe_customer_id") or customer
                upsert_row(conn, row)
    log.info("attempt detail of invoice %s from Stripe: %s, %s", invoice_id, intent["id"],
             (intent.get("last_payment_error") or {}).get("decline_code") or "no decline code")
    if created:
        try:
            enqueue_recompute(celery_app, str(account), trigger, cause)
        except BrokerUnavailable as exc:  # the request row stays: the stale-request re-drive sends it
            log.warning("recompute of %s not queued, beat will re-drive it: %s", account, exc)
