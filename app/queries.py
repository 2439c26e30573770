"""Read-side queries for the API, the CLI and the support page (no writes here)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from app.domain.billing_history import history
from app.domain.entitlements import full_entitlements
from app.domain.snapshot import Subscription, decision_moment
from app.domain.state import outstanding_fields, outstanding_of
from app.recompute.gather import gather

DUNNING_SQL = """
SELECT a.account_id, a.bad_debt, d.status, d.level, d.failure_class, d.next_retry_at, d.retry_invoice_id,
       d.retries_used, d.outstanding_amount, d.outstanding, d.unpaid_since, d.reasons, d.entitlements, d.version,
       d.policy_version, d.changed_at, d.last_trigger,
       -- No stored state yet: the subscriptions, for the entitlements that stand for it.
       CASE WHEN d.account_id IS NULL THEN
         (SELECT json_agg(json_build_array(s.id, s.status, s.products) ORDER BY s.id)
            FROM stripe_subscription s
           WHERE s.stripe_customer_id IN (SELECT c.stripe_customer_id FROM subs_customer c
                                           WHERE c.account_id = a.account_id))
       END AS unstored_subscriptions
  FROM subs_account a LEFT JOIN subs_dunning d USING (account_id)
 WHERE a.account_id = %(account)s
"""


def _entitlements(row: Any) -> dict[str, Any]:
    """The stored entitlements; with no subs_dunning row yet, those of a current account (every
    product of its active subscriptions in full): what no row stands for (the drift sweep takes it
    so) and what its first recompute stores when nothing is unpaid, not an object with no keys."""
    if row["version"] is not None:
        return dict(row["entitlements"] or {})
    subscriptions = [Subscription(id=s[0], status=s[1], products=tuple(s[2] or ()))
                     for s in row["unstored_subscriptions"] or ()]
    return full_entitlements(subscriptions)


def _iso(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


def dunning_view(conn: Connection, account_id: str) -> dict[str, Any] | None:
    row = conn.exec_driver_sql(DUNNING_SQL, {"account": account_id}).mappings().first()
    if row is None:
        return None
    return {
        "account_id": row["account_id"],
        "status": row["status"] or "current",
        "level": row["level"] or "none",
        "failure_class": row["failure_class"],
        "next_retry_at": _iso(row["next_retry_at"]),
        "retry_invoice_id": row["retry_invoice_id"],
        "retries_used": row["retries_used"] or 0,
        # Per currency (amounts in different currencies never add up); outstanding_amount only in one.
        **outstanding_fields(outstanding_of(row["outstanding"], row["outstanding_amount"] or 0)),
        "unpaid_since": _iso(row["unpaid_since"]),
        "bad_debt": bool(row["bad_debt"]),
        "reasons": row["reasons"] or [],
        "entitlements": _entitlements(row),
        "version": row["version"] or 0,
        "policy_version": row["policy_version"],
        "changed_at": _iso(row["changed_at"]),
        "last_trigger": row["last_trigger"],
    }


def billing_history(conn: Connection, account_id: str, now: Any = None) -> list[dict[str, Any]] | None:
    gathered = gather(conn, account_id)
    if gathered is None:
        return None
    snapshot, _ = gathered
    out = []
    # Labelled at the stored decision's moment when it is ahead of this host's clock (decision_moment):
    # shown beside that decision (the support page, GET /dunning), an invoice past due by it must not
    # read Open on a host whose clock is behind the one that decided.
    for row in history(snapshot, decision_moment(snapshot, now) if now is not None else None):
        inv = row.invoice
        out.append({
            "id": inv.id,
            "label": row.label.value,
            "status": inv.status,
            "amount_due": inv.amount_due,
            "amount_paid": inv.amount_paid,
            "amount_remaining": inv.amount_remaining,
            "currency": inv.currency,
            "billing_reason": inv.billing_reason,
            "subscription_id": inv.subscription_id,
            "products": list(inv.products),
            "created": inv.created.isoformat(),
            "attempts": row.attempts,
        })
    return out
