"""Attempts and the invoices they were paying, and when each failed. Pure.

Since Stripe API 2025-03-31 a charge or payment intent names no invoice: ``attempts_by_invoice``
files each unlinked attempt under the invoice it most likely paid, and a one-off charge (no invoice's
failure, nor of any invoice's amount) under none. A bad-debt payment's own intent
is filed like any other, and ``without_bad_debt_payments`` takes it out where the regular
collection path is decided.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from app.domain.snapshot import Attempt, Invoice, Snapshot

# An invoice's failure and its charge's decline are two events about one attempt, seconds apart.
SAME_ATTEMPT = timedelta(minutes=1)


def failure_time(attempt: Attempt) -> datetime:
    """When an attempt's latest failure happened: its latest charge, or its latest failure that made
    no charge (a failed 3-D Secure, timed by the event that reported it), whichever is later.

    Stripe retries an invoice on the same payment intent: the attempt's row carries every charge,
    so its latest charge is its latest try, unless a later try made none (a failed 3-D Secure on
    the reused intent, its charges still the earlier ones). Both times stay put when more events
    about the attempt come (its intent's, a cancellation of the intent), where the attempt's own
    time moves with each: that is the time only of a row that has neither (from before the mirror
    kept failed_at)."""
    times = [c.charged_at for c in attempt.charges]
    if attempt.failed_at is not None:
        times.append(attempt.failed_at)
    return max(times) if times else attempt.attempted_at


def first_failure_time(attempt: Attempt, invoice: Invoice) -> datetime:
    """When a failed attempt of ``invoice`` first failed: its first charge (Stripe confirms the
    invoice's intent again for each retry, so one row carries the first attempt and every retry after
    it), else its own time. Not its own time alone: that moves with each later event about the intent,
    and read as the first failure it would restart the invoice's retry schedule and its days unpaid at
    the latest retry. A charge before the invoice was created is none of its failures (an older intent
    that ``_owner`` filed under it by a later event's time): it never dates the invoice's debt back."""
    times = [c.charged_at for c in attempt.charges]
    if attempt.failed_at is not None:
        times.append(attempt.failed_at)
    return min((t for t in times if t >= invoice.created), default=attempt.attempted_at)


def attempts_by_invoice(snapshot: Snapshot) -> dict[str | None, list[Attempt]]:
    """Attempts grouped by invoice. An attempt Stripe did not link to an invoice (charge.failed
    carries no invoice since API 2025-03-31) goes to an invoice it could have been paying (see
    ``_owner``)."""
    grouped: dict[str | None, list[Attempt]] = {}
    by_created = sorted(snapshot.invoices, key=lambda i: (i.created, i.id))
    intents = {p.stripe_payment_intent_id for p in snapshot.bad_debt_payments if p.stripe_payment_intent_id}
    for attempt in snapshot.attempts:
        invoice_id = attempt.invoice_id
        if invoice_id is None:
            owner = _owner(by_created, attempt, attempt.id in intents)
            invoice_id = owner.id if owner is not None else None
        grouped.setdefault(invoice_id, []).append(attempt)
    for attempts in grouped.values():
        attempts.sort(key=lambda a: (a.attempted_at, a.id))
    return grouped


def bad_debt_intents(snapshot: Snapshot) -> list[Attempt]:
    """The attempts that are bad-debt payments' own intents."""
    intents = {p.stripe_payment_intent_id for p in snapshot.bad_debt_payments if p.stripe_payment_intent_id}
    return [a for a in snapshot.attempts if a.id in intents] if intents else []


def without_bad_debt_payments(grouped: dict[str | None, list[Attempt]], snapshot: Snapshot
                              ) -> dict[str | None, list[Attempt]]:
    """The invoices' own attempts: a bad-debt payment's intent (standalone, filed under an invoice
    by ``_owner``) is no attempt of the regular collection path. Its decline is no failure of the
    invoice, and must not change the invoice's failure class or plan its retries. Its charges still
    count for the card's 30-day cap (retry_cadence reads every attempt), its refunds for the
    invoice's billing-history label, and its decline is still a failed payment (PaymentFailed)."""
    intents = {p.stripe_payment_intent_id for p in snapshot.bad_debt_payments if p.stripe_payment_intent_id}
    if not intents:
        return grouped
    return {invoice: [a for a in attempts if a.id not in intents] for invoice, attempts in grouped.items()}


def _owner(by_created: list[Invoice], attempt: Attempt, bad_debt_intent: bool = False) -> Invoice | None:
    """The invoice an unlinked attempt was most likely paying: among those created before it and
    still open when it ran (not paid or voided before), the one whose last failure was at that
    moment (Stripe's invoice.payment_failed of the same attempt), else the latest of the same
    amount (a hosted-page payment or our retry, POST /v1/invoices/<id>/pay, before the event that
    links it). An invoice settled before the attempt cannot have been its target: a decline there
    would be read as this invoice's and set the wrong failure class. With none open, the latest of
    its amount created before it.

    Any other attempt is none of the invoices': a one-off charge (a Checkout purchase, a charge made
    in the Dashboard) whose intent no invoice names and whose failure is no invoice's. Filed under
    the open invoice, its charge counted as a retry of it (the schedule moved on), tried a new card
    (its free retry used up), its decline set the invoice's failure class, and its success held bad
    debt as a payment in flight. A bad-debt payment's own intent (``bad_debt_intent``: it pays the
    account's invoices, its amount their sum) still goes to the latest open one, else the latest
    created before it: its refunds count for that invoice's billing-history label.

    Only an invoice of the attempt's own Stripe customer (where both say theirs: an account may
    have several): Stripe pays an invoice with its customer's methods only, and another customer's
    invoice of the same price is none of its."""
    at = attempt.attempted_at
    earlier = [i for i in by_created if i.created <= at and i.status != "draft"
               and (bad_debt_intent or _of_customer(attempt, i))]
    open_then = [i for i in earlier if not any(t is not None and t < at for t in (i.paid_at, i.voided_at))]
    same_amount = [i for i in open_then if _of_amount(attempt, i)]
    failed_then = [i for i in same_amount or open_then if _failed_with(attempt, i)]
    if bad_debt_intent:
        pick = failed_then or same_amount or open_then or earlier
    else:
        pick = failed_then or same_amount or [i for i in earlier if _of_amount(attempt, i)]
    return pick[-1] if pick else None


def _failed_with(attempt: Attempt, invoice: Invoice) -> bool:
    """Whether the attempt failed at a moment the invoice failed (Stripe's invoice.payment_failed of
    that very attempt): its own time, or one of its charges or its chargeless failure, within a minute
    of the invoice's first or last failure. The invoice's own intent, which Stripe confirms again for
    each retry, keeps the charge of its first failure when later events move its own time."""
    failures = [t for t in (invoice.first_failed_at, invoice.last_failed_at) if t is not None]
    times = [attempt.attempted_at, *(c.charged_at for c in attempt.charges)]
    if attempt.failed_at is not None:
        times.append(attempt.failed_at)
    return any(abs(f - t) <= SAME_ATTEMPT for f in failures for t in times)


def _of_customer(attempt: Attempt, invoice: Invoice) -> bool:
    mine, theirs = attempt.stripe_customer_id, invoice.stripe_customer_id
    return mine is None or theirs is None or mine == theirs


def _of_amount(attempt: Attempt, invoice: Invoice) -> bool:
    return bool(attempt.amount) and attempt.amount in (invoice.amount_due, invoice.amount_remaining)
