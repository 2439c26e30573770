"""The whole list of an invoice's lines, for an invoice whose webhook carried its first lines only.

Stripe's invoice object in an event carries the first handful of its line items: ``lines`` is a list
object whose ``has_more`` says there are more, at ``GET /v1/invoices/<id>/lines`` (paginated,
``starting_after``, at most 100 a page). Consequences apply to the products on the unpaid invoices
(DESIGN section 4), so a product on a later line kept full access while its invoice was unpaid,
and was not cancelled in bad debt; an upgrade's credit lines could be missed.

The webhook path does not ask Stripe (one statement per batch): the mirror records the event's
``has_more`` (stripe_invoice.lines_incomplete) and compute's reasons say the lines are incomplete.
Beat (tasks.fetch_invoice_lines) then, for each such invoice that is debt (what compute acts on):

* lists its lines from Stripe, every page;
* stores them (the mirror's shape, webhooks/mirror.invoice_lines) and clears ``lines_incomplete``
  in one transaction with the account's recompute request, queued after the commit. A finalized
  invoice's lines no longer change: a later event's first page neither replaces the whole list
  nor marks it incomplete again (webhooks/store.py, merge rule "lines").

A passing error (no answer, a 5xx) leaves the invoice for the next pass; a rate limit or a key
Stripe refuses ends the pass; Stripe refusing to list one invoice's lines (a 4xx about it) is
asked again an hour later (``lines_asked_at``). Any other error about one invoice (a page or a line
that cannot be read) costs that invoice only: logged, asked again later, the pass goes on; a
database error fails the pass. Every ask is noted (``lines_tried_at``, before asking) and a pass
takes the invoices never asked first, then the least recently asked: an invoice that keeps failing
goes behind the others instead of taking a place in every pass. One pass at a time (an advisory
lock), within a time budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg2
import stripe
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from psycopg2.extras import Json
from sqlalchemy.exc import SQLAlchemyError

from app import metrics
from app.db import unit_of_work
from app.dispatch import BrokerUnavailable, enqueue_recompute
from app.domain.triggers import Trigger
from app.payments.stripe_pass import ENDS_PASS, about_the_invoice, pause_after, run_pass
from app.runtime import Runtime
from webhooks.mirror import invoice_lines

log = logging.getLogger(__name__)

PAGE = 100  # Stripe's largest page
# An invoice whose lines Stripe refused to list (a 4xx about it) is asked about again this much later.
REFUSED_AGAIN = timedelta(hours=1)
# The incomplete invoices that are debt as compute reads it (app/domain/compute.is_unpaid): only
# their products get consequences. Through the partial index on lines_incomplete.
DUE = """
SELECT i.id, i.subscription_id FROM stripe_invoice i
 WHERE i.lines_incomplete AND i.status IN ('open', 'uncollectible') AND i.amount_remaining > 0
   AND (i.status = 'uncollectible' OR i.first_failed_at IS NOT NULL OR i.due_date <= %(now)s)
   AND (i.lines_asked_at IS NULL OR i.lines_asked_at <= %(again)s)
 ORDER BY i.lines_tried_at NULLS FIRST, i.id LIMIT %(limit)s
"""
# Noted before each ask, whatever comes of it (a 5xx, an error, the pass failing): the next pass
# takes the invoices asked least recently first, so one that keeps failing cannot hold the others
# back (more than ``limit`` such invoices took every pass's places).
TRIED = "UPDATE stripe_invoice SET lines_tried_at = %(at)s WHERE id = %(id)s"
# Only while still incomplete and finalized (a draft's lines may change; an invoice never goes back
# to draft): a pass that raced another writer stores nothing twice.
STORE = """
UPDATE stripe_invoice SET lines = %(lines)s, lines_incomplete = false, lines_asked_at = NULL
 WHERE id = %(id)s AND lines_incomplete AND status <> 'draft'
RETURNING id
"""
# The account the invoice's customer maps to (none: its events wait unroutable, and their re-drive
# recomputes it once mapped, reading the lines stored here).
ACCOUNT = """
SELECT c.account_id FROM stripe_invoice i JOIN subs_customer c USING (stripe_customer_id) WHERE i.id = %(id)s
"""
REFUSED = "UPDATE stripe_invoice SET lines_asked_at = %(at)s WHERE id = %(id)s"
LOCK = "invoice_lines"
# Errors of the database: the pass fails (a stuck row, retried), as no other invoice would be stored.
DATABASE = (SQLAlchemyError, psycopg2.Error)


@dataclass
class LinesReport:
    asked: int = 0
    fetched: list[str] = field(default_factory=list)  # invoices whose whole list this pass stored
    errors: int = 0  # Stripe did not give them, or they could not be read
    busy: bool = False  # another pass was running
    paused: bool = False  # a rate limit's Retry-After held the pass back (app/payments/stripe_pass.py)

    def to_json(self) -> dict[str, Any]:
        return {"asked": self.asked, "fetched": len(self.fetched), "errors": self.errors, "busy": self.busy,
                "paused": self.paused}


def fetch_incomplete_lines(rt: Runtime, celery_app: Celery, now: datetime, limit: int = 50,
                           budget_seconds: float = 30.0) -> LinesReport:
    """One pass: fetch the whole list of lines of up to ``limit`` incomplete invoices that are debt,
    starting none after ``budget_seconds``. Raises database errors."""
    report = LinesReport()
    outcome = run_pass(
        rt, LOCK,
        lambda conn: conn.exec_driver_sql(DUE, {"now": now, "again": now - REFUSED_AGAIN, "limit": limit}).fetchall(),
        lambda client, row: _fetch(rt, celery_app, client, row[0], row[1], now, report), budget_seconds)
    report.busy, report.paused = outcome == "busy", outcome == "paused"
    return report


def _fetch(rt: Runtime, celery_app: Celery, client: stripe.StripeClient, invoice_id: str,
           subscription_id: str | None, now: datetime, report: LinesReport) -> bool:
    """Fetch and store one invoice's lines; False when the pass must end. An error about this
    invoice alone (not Stripe's, not the database's: a page or a line that cannot be read) is
    logged and costs this invoice only: asked again later, the pass goes on."""
    report.asked += 1
    with unit_of_work(rt.engine) as conn:
        conn.exec_driver_sql(TRIED, {"id": invoice_id, "at": now})
    try:
        return _fetch_one(rt, celery_app, client, invoice_id, subscription_id, now, report)
    except (*DATABASE, SoftTimeLimitExceeded):  # the database's fault, or the task's time is up: the pass's
        raise
    except Exception:
        report.errors += 1
        metrics.INVOICE_LINES.labels("error").inc()
        log.exception("the lines of invoice %s could not be fetched or stored: skipped, asked again in a "
                      "later pass; the pass goes on", invoice_id)
        return True


def _fetch_one(rt: Runtime, celery_app: Celery, client: stripe.StripeClient, invoice_id: str,
               subscription_id: str | None, now: datetime, report: LinesReport) -> bool:
    try:
        lines = all_lines(client, invoice_id)
    except stripe.StripeError as exc:
        report.errors += 1
        metrics.INVOICE_LINES.labels("error").inc()
        ends = isinstance(exc, ENDS_PASS)
        pause = pause_after(rt, LOCK, exc) if ends else None
        log.warning("Stripe did not list the lines of invoice %s (%s)%s%s", invoice_id, exc.__class__.__name__,
                    "; the pass ends" if ends else "",
                    f", none before {pause:.0f} s (Retry-After)" if pause is not None else "")
        if about_the_invoice(exc):  # asked again later
            with unit_of_work(rt.engine) as conn:
                conn.exec_driver_sql(REFUSED, {"id": invoice_id, "at": now})
        return not ends
    stored = invoice_lines(lines, subscription_id)
    cause = f"invoice_lines:{invoice_id}"
    trigger = Trigger.STATE_REFRESH.value
    from webhooks.store import request_recompute

    created = False
    with unit_of_work(rt.engine) as conn:
        # The request row first, then the mirror row: the order webhook ingest locks them in (the
        # other order deadlocked with a webhook of the same account). Stored nothing (another
        # writer was first), the request costs a recompute more.
        found = conn.exec_driver_sql(ACCOUNT, {"id": invoice_id}).scalar()
        account = str(found) if found is not None else None
        if account is not None:
            created = request_recompute(conn, account, trigger, cause)
        wrote = conn.exec_driver_sql(STORE, {"id": invoice_id, "lines": Json(stored)}).first() is not None
    if wrote:
        report.fetched.append(invoice_id)
        metrics.INVOICE_LINES.labels("fetched").inc()
        log.info("lines of invoice %s from Stripe: %d", invoice_id, len(stored))
    else:  # its whole list was stored meanwhile (an event carrying all of it, another pass)
        metrics.INVOICE_LINES.labels("not_stored").inc()
        log.info("lines of invoice %s from Stripe not stored: the invoice is no longer incomplete", invoice_id)
    if created and account is not None:
        try:
            enqueue_recompute(celery_app, account, trigger, cause)
        except BrokerUnavailable as exc:  # the request row stays: the stale-request re-drive sends it
            log.warning("recompute of %s not queued, beat will re-drive it: %s", account, exc)
    return True


def all_lines(client: stripe.StripeClient, invoice_id: str) -> list[dict[str, Any]]:
    """Every line item of the invoice, page after page, in Stripe's order."""
    lines: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": PAGE}
    while True:
        page = client.v1.invoices.line_items.list(invoice_id, params)  # type: ignore[arg-type]
        data = [line.to_dict() for line in page.data]
        lines.extend(data)
        if not page.has_more or not data:
            return lines
        params = {"limit": PAGE, "starting_after": data[-1]["id"]}
