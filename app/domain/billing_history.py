"""Billing-history labels: what actually happened to each invoice.

``Paid`` means customer money was collected and kept; ``Resolved`` means the invoice was closed
without that (voided, credited, written off, paid out of band, refunded). Support and customers
read these labels, so a credited invoice must never say "Paid".
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum

from app.domain.snapshot import Attempt, Invoice


class Label(StrEnum):
    PAID = "Paid"
    RESOLVED = "Resolved"
    OPEN = "Open"
    PAST_DUE = "Past due"
    UNCOLLECTIBLE = "Uncollectible"


def label(invoice: Invoice, attempts: Iterable[Attempt] = (), now: datetime | None = None) -> Label:
    attempts = list(attempts)
    if invoice.status == "void":
        return Label.RESOLVED
    if invoice.status == "uncollectible":
        return Label.UNCOLLECTIBLE
    if invoice.status == "paid":
        collected = invoice.amount_paid
        refunded = sum(a.amount_refunded for a in attempts if a.status in ("succeeded", "refunded"))
        if collected <= 0 or collected < invoice.amount_due:
            return Label.RESOLVED  # credited, forgiven or paid out of band: not the customer's money
        # The money went back, refunded or credited after payment (a credit note that refunds counts
        # in both, hence the larger, not the sum); a partial return still leaves it Paid.
        if max(refunded, invoice.credited_amount) >= collected:
            return Label.RESOLVED
        return Label.PAID
    if invoice.status != "open":
        return Label.OPEN
    if invoice.due_date is not None and now is not None:
        # Sent with payment terms: past due from its due date, not from an early payment that failed.
        return Label.PAST_DUE if invoice.due_date <= now else Label.OPEN
    failed = invoice.first_failed_at is not None or any(a.failed for a in attempts)
    return Label.PAST_DUE if failed else Label.OPEN
