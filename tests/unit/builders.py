"""Hand-built snapshots for compute tests. Times are relative to NOW."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from app.domain.policy import Policy
from app.domain.snapshot import (
    Attempt,
    BadDebtPayment,
    Invoice,
    InvoiceLine,
    PaymentMethod,
    Retry,
    Snapshot,
    Subscription,
)
from app.policy_file import load_policy

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def days(n: float) -> datetime:
    return NOW - timedelta(days=n)


def policy(**changes: Any) -> Policy:
    return replace(load_policy(), **changes)


def invoice(inv_id: str = "in_1", *, status: str = "open", failed_days_ago: float | None = 1, amount: int = 5000,
            product: str = "prod_core", billing_reason: str = "subscription_cycle", sub: str = "sub_1",
            attempt_count: int = 1, **kw: Any) -> Invoice:
    failed = days(failed_days_ago) if failed_days_ago is not None else None
    paid = status == "paid"
    return Invoice(
        id=inv_id, status=status, billing_reason=billing_reason, subscription_id=sub,
        amount_due=amount, amount_paid=amount if paid else 0, amount_remaining=0 if paid else amount,
        created=(failed or NOW) - timedelta(hours=1), lines=(InvoiceLine(product, amount),),
        attempt_count=attempt_count if failed else 0, first_failed_at=failed, last_failed_at=failed, **kw,
    )


def attempt(att_id: str, inv_id: str | None, *, days_ago: float, decline: str | None = "insufficient_funds",
            status: str = "failed", pm: str = "pm_1", **kw: Any) -> Attempt:
    return Attempt(id=att_id, invoice_id=inv_id, payment_method_id=pm, status=status, attempted_at=days(days_ago),
                   decline_code=decline if status == "failed" else None, **kw)


def method(pm_id: str = "pm_2", *, changed_days_ago: float = 0.01, attached: bool = True, **kw: Any) -> PaymentMethod:
    return PaymentMethod(id=pm_id, type="card", attached=attached, changed_at=days(changed_days_ago), **kw)


def retry(inv_id: str, n: int, *, days_ago: float, free: bool = False, state: str = "sent",
          pm: str = "pm_1") -> Retry:
    return Retry(invoice_id=inv_id, payment_method_id=pm, retry_number=n, free=free, state=state,
                 scheduled_for=days(days_ago), created_at=days(days_ago))


def snapshot(*invoices: Invoice, attempts: tuple[Attempt, ...] = (), **kw: Any) -> Snapshot:
    subs = kw.pop("subscriptions", (Subscription("sub_1", "active", ("prod_core",)),))
    return Snapshot(account_id="acct_1", stored=None, invoices=invoices, attempts=attempts, subscriptions=subs, **kw)


TWO_SUBSCRIPTIONS = (Subscription("sub_1", "active", ("prod_core",)), Subscription("sub_2", "active", ("prod_other",)))


def two_invoices_in_bad_debt() -> tuple[Invoice, Invoice, tuple[Attempt, Attempt]]:
    """in_a and in_b of sub_1, failed on an expired card 40 and 38 days ago, 8 attempts each."""
    a = replace(invoice("in_a", failed_days_ago=40, attempt_count=8), created=days(41))
    b = replace(invoice("in_b", failed_days_ago=38, attempt_count=8), created=days(39))
    return a, b, (attempt("pi_a", "in_a", days_ago=40, decline="expired_card"),
                  attempt("pi_b", "in_b", days_ago=38, decline="expired_card"))


def declined_bad_debt_payment(days_ago: float) -> tuple[Attempt, BadDebtPayment]:
    """A bad-debt payment of 10000 declined for insufficient funds ``days_ago``: its standalone
    intent (linked to no invoice) and its row."""
    intent = attempt("pi_bd", None, days_ago=days_ago, decline="insufficient_funds", amount=10000)
    payment = BadDebtPayment(id=1, state="failed", amount=10000, created_at=days(days_ago + 0.01),
                             updated_at=days(days_ago), failure_reason="declined: insufficient_funds",
                             stripe_payment_intent_id="pi_bd")
    return intent, payment
