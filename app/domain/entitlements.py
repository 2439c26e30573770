"""Entitlements: what each product of the account allows under the current consequences.

Consequences are scoped to the products on the unpaid invoices. premium goes first (restrict_premium),
core is kept longest (read-only at limited), suspended revokes; an unpaid upgrade withholds only
the upgraded products.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from app.domain.policy import Policy
from app.domain.snapshot import Invoice, Subscription
from app.domain.state import Access, Level

INACTIVE_SUBSCRIPTIONS = frozenset({"canceled", "incomplete_expired"})


def access(level: Level, tier: str, upgrade: bool) -> Access:
    if level.rank < Level.RESTRICT_PREMIUM.rank:
        return Access.FULL
    if upgrade:
        return Access.WITHHELD
    if level == Level.SUSPENDED:
        return Access.REVOKED
    if tier == "premium":
        return Access.REVOKED
    return Access.READ_ONLY if level == Level.LIMITED else Access.FULL


ACCESS_SEVERITY = [Access.FULL, Access.READ_ONLY, Access.WITHHELD, Access.REVOKED]


def entitlements(subscriptions: Iterable[Subscription], unpaid: Iterable[tuple[Invoice, Level]],
                 policy: Policy) -> dict[str, Any]:
    """Every product the account has, at the access its unpaid invoices' levels allow; products
    on no unpaid invoice keep full access (an annual product already paid stays untouched)."""
    products: dict[str, Access] = {}
    for sub in subscriptions:
        if sub.status not in INACTIVE_SUBSCRIPTIONS:
            for product in sub.products:
                products.setdefault(product, Access.FULL)
    unpaid = list(unpaid)
    for invoice, level in unpaid:
        for product in invoice.products:
            allowed = access(level, policy.tier(product), invoice.is_upgrade)
            current = products.get(product, Access.FULL)
            products[product] = max(current, allowed, key=ACCESS_SEVERITY.index)
    plan_changes = not any(level.rank >= Level.LIMITED.rank and not invoice.is_upgrade for invoice, level in unpaid)
    return {"products": {p: products[p].value for p in sorted(products)}, "plan_changes": plan_changes}


def full_entitlements(subscriptions: Iterable[Subscription]) -> dict[str, Any]:
    """``entitlements`` with nothing unpaid: every product of an active subscription in full."""
    products: dict[str, None] = {}
    for sub in subscriptions:
        if sub.status not in INACTIVE_SUBSCRIPTIONS:
            for product in sub.products:
                products[product] = None
    return {"products": {p: Access.FULL.value for p in sorted(products)}, "plan_changes": True}
