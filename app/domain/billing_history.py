"""Billing-history labels: what actually happened to each invoice.

``Paid`` means customer money was collected and kept; ``Resolved`` means the invoice was closed
without that (voided, credited, written off, paid out of band, refunded). Support and customers
read these labels, so a credited invoice must never say "Paid". An invoice that asked for nothing
(a trial's $0 invoice) is ``Paid``: nothing was forgiven or credited.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from app.domain.attempts import attempts_by_invoice, bad_debt_intents
from app.domain.snapshot import Attempt, Invoice, Snapshot, paused_markings


class Label(StrEnum):
    PAID = "Paid"
    RESOLVED = "Resolved"
    OPEN = "Open"
    PAST_DUE = "Past due"
    UNCOLLECTIBLE = "Uncollectible"


@dataclass(frozen=True)
class InvoiceHistory:
    invoice: Invoice
    label: Label
    attempts: int  # its own payment attempts


def history(snapshot: Snapshot, now: datetime | None = None) -> list[InvoiceHistory]:
    """Every invoice but drafts, newest first, with its label and its number of payment attempts. A
    draft is no bill yet (the customer was sent nothing, and it may still be edited or deleted:
    Stripe deletes only drafts, and invoice.deleted is not mirrored). A bad-debt
    payment's intent that attempts._owner filed under an invoice is no attempt of it: its decline
    does not make the invoice past due and it does not count as its attempt; its refunds still count
    against the invoice's Paid."""
    grouped = attempts_by_invoice(snapshot)
    intents = {a.id for a in bad_debt_intents(snapshot)}
    paused = paused_markings(snapshot, lambda: {invoice: [a for a in attempts if a.id not in intents]
                                                for invoice, attempts in grouped.items()})
    return [
        InvoiceHistory(invoice=inv, label=label(inv, grouped.get(inv.id, ()), now, bad_debt_intent_ids=intents,
                                                marked_by_pause=inv.id in paused),
                       attempts=attempt_count(a for a in grouped.get(inv.id, ()) if a.id not in intents))
        for inv in sorted(snapshot.invoices, key=lambda i: (i.created, i.id), reverse=True)
        if inv.status != "draft"
    ]


def attempt_count(own: Iterable[Attempt]) -> int:
    """How many times the invoice was tried. Stripe retries an invoice on the same payment intent, so
    one attempt row carries every charge of its retries: each charge counts, and an attempt with none
    known (a 3-D Secure failure) once. Not Stripe's attempt_count, which goes on counting the retries
    it schedules but does not make after a decline it will not retry."""
    return sum(max(1, len(a.charges)) for a in own)


def label(invoice: Invoice, attempts: Iterable[Attempt] = (), now: datetime | None = None, *,
          bad_debt_intent_ids: Collection[str] = (), marked_by_pause: bool = False) -> Label:
    """The invoice's label from the attempts filed under it. ``bad_debt_intent_ids`` names those that
    are bad-debt payments' intents: their refunds count, their declines are no failure of the invoice.
    ``marked_by_pause``: Stripe marked it uncollectible because its subscription's collection was
    paused with mark_uncollectible (snapshot.marked_by_pause), so an uncollectible one is Resolved:
    closed without the customer paying, forgiven by the merchant, no debt."""
    attempts = list(attempts)
    if invoice.status == "void":
        return Label.RESOLVED
    if invoice.status == "uncollectible":
        return Label.RESOLVED if marked_by_pause else Label.UNCOLLECTIBLE
    if invoice.status == "paid":
        if invoice.total is not None and invoice.total <= 0 and invoice.amount_due <= 0:
            return Label.PAID  # nothing was owed (a trial's $0 invoice): nothing forgiven or credited
        collected = invoice.amount_paid
        if collected <= 0 or collected < invoice.amount_due:
            return Label.RESOLVED  # credited, forgiven or paid out of band: not the customer's money
        # The money went back, credited after payment or refunded (a credit note that refunds counts
        # in both); a partial return still leaves it Paid. Each payment on its own: an invoice paid
        # twice (the customer's card and our bad-debt payment) stays Paid while one of the two is kept.
        # A payment counts as returned once the invoice's share of it is (a bad-debt payment may
        # cover several invoices: all of its refund counts against the one its intent is filed under).
        money = [a for a in attempts if a.status in ("succeeded", "refunded")]
        if invoice.credited_amount >= collected or (
                money and all(a.amount_refunded >= min(a.amount or collected, collected) for a in money)):
            return Label.RESOLVED
        return Label.PAID
    if invoice.status != "open":
        return Label.OPEN
    if invoice.due_date is not None and now is not None:
        # Sent with payment terms: past due from its due date, not from an early payment that failed.
        return Label.PAST_DUE if invoice.due_date <= now else Label.OPEN
    failed = invoice.first_failed_at is not None or any(a.failed and a.id not in bad_debt_intent_ids for a in attempts)
    return Label.PAST_DUE if failed else Label.OPEN
