"""Entitlements: what each product of the account allows under the current consequences.

Consequences are scoped to the products on the unpaid invoices. premium goes first (restrict_premium),
core is kept longest (read-only at limited), suspended revokes; an unpaid upgrade withholds only
what it added, never what the customer held before it (see ``upgrade_access``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from app.domain.policy import Policy
from app.domain.snapshot import Invoice, Subscription
from app.domain.state import Access, Level

INACTIVE_SUBSCRIPTIONS = frozenset({"canceled", "incomplete_expired"})
# Subscriptions whose products are not provisioned: those that ended, and those Stripe has not started
# or has paused. ``incomplete``: its first payment is not made yet (every subscription created with
# payment_behavior=default_incomplete until the customer confirms it; Stripe expires it after 23 hours
# if never paid). ``paused``: its trial ended with no payment method, and it bills nothing until resumed.
# Granted in the entitlements, sent whole, Account Management would provision a product nobody paid
# for. A paused subscription is still the customer's (bad debt of an earlier invoice still cancels it:
# compute reads INACTIVE_SUBSCRIPTIONS for that); it only grants nothing while paused.
NOT_PROVISIONED = INACTIVE_SUBSCRIPTIONS | frozenset({"incomplete", "paused"})


def access(level: Level, tier: str) -> Access:
    """A product on an unpaid regular invoice."""
    if level.rank < Level.RESTRICT_PREMIUM.rank:
        return Access.FULL
    if level == Level.SUSPENDED:
        return Access.REVOKED
    if tier == "premium":
        return Access.REVOKED
    return Access.READ_ONLY if level == Level.LIMITED else Access.FULL


def upgrade_access(level: Level, invoice: Invoice, product: str) -> Access:
    """A product an unpaid upgrade charges for: only what the upgrade added is withheld.

    A product the invoice also credits (Stripe's proration credit for the unused time of what the
    subscription held before) was already the customer's: a seat or quantity increase keeps it in
    full. A product that replaced one the invoice credits and no longer charges (a plan swap,
    core -> premium) keeps the access held before: ``premium_off``, DESIGN's restrict_premium (premium
    features off, core kept). Anything else is new (an add-on): withheld. While the invoice's lines
    are not all known (its event carried the first ones: compute's lines.incomplete reason), its
    credits may be on the others: nothing is withheld until beat has fetched them."""
    if level.rank < Level.RESTRICT_PREMIUM.rank or invoice.lines_incomplete:
        return Access.FULL
    if product in invoice.credited_products:
        return Access.FULL
    return Access.PREMIUM_OFF if product in _replaced(invoice) else Access.WITHHELD


def _replaced(invoice: Invoice) -> dict[str, tuple[str, ...]]:
    """The new products of an upgrade that replaced a product it credits and no longer charges, each
    with the dropped products it may have replaced.

    A new product charged on the subscription item of a dropped product's credit is that product's
    replacement (a price change on the item). The new products left are replacements only when
    each can have a dropped product of its own left (a swap by a new item; which one cannot be told,
    so any of those left); more new products than that cannot be told from an add-on bought beside
    the swap, and none of them is let through."""
    held, charged = invoice.credited_products, invoice.products
    dropped = [p for p in held if p not in charged]
    new = [p for p in charged if p not in held]
    dropped_items = {ln.item: ln.product for ln in invoice.lines
                     if ln.amount < 0 and ln.item is not None and ln.product in dropped}
    paired = {ln.product: dropped_items[ln.item] for ln in invoice.lines
              if ln.amount > 0 and ln.product in new and ln.item in dropped_items}
    new_left = [p for p in new if p not in paired]
    dropped_left = tuple(p for p in dropped if p not in paired.values())
    replaced: dict[str, tuple[str, ...]] = {p: (paired[p],) for p in paired}
    if len(new_left) <= len(dropped_left):
        replaced.update({p: dropped_left for p in new_left})
    return replaced


ACCESS_SEVERITY = [Access.FULL, Access.PREMIUM_OFF, Access.READ_ONLY, Access.WITHHELD, Access.REVOKED]


# Invoices that bill nothing: a draft is not issued yet (it may be deleted), a voided one is cancelled.
NOT_BILLED = frozenset({"draft", "void"})


def billed_products(subscriptions: Iterable[Subscription], invoices: Iterable[Invoice]) -> tuple[str, ...]:
    """The products the account's invoices bill that no subscription the snapshot knows speaks for:
    those of invoices of no subscription (a one-off purchase), and those of a subscription the
    mirror does not know (its events not received), whatever the invoices' status. Entitlements are
    sent whole: a product that only such an invoice shows must stay in them once the invoice is
    paid, or Account Management takes away what the customer has just paid for.

    A subscription's products as its invoices bill them: those of its latest invoice that is not an
    upgrade (a renewal or its first invoice bills every item), with what the upgrades since then
    charge, less what they credit and no longer charge (a product swapped out). An invoice whose
    lines are not all known only adds (what its other lines charge or credit is not known). Draft
    and void invoices bill nothing. Known subscriptions' own items decide for them (an ended one
    grants nothing). Pure and in a set order (invoices by created, then id)."""
    known = {sub.id for sub in subscriptions}
    out: dict[str, None] = {}
    held: dict[str, dict[str, None]] = {}
    for inv in sorted(invoices, key=lambda i: (i.created, i.id)):
        if inv.status in NOT_BILLED or (inv.subscription_id is not None and inv.subscription_id in known):
            continue
        if inv.subscription_id is None:
            out.update(dict.fromkeys(inv.products))
            continue
        sub = held.setdefault(inv.subscription_id, {})
        if not inv.is_upgrade and not inv.lines_incomplete:
            sub.clear()
        sub.update(dict.fromkeys(inv.products))
        if inv.is_upgrade and not inv.lines_incomplete:
            for product in inv.credited_products:
                if product not in inv.products:
                    sub.pop(product, None)
    for sub_products in held.values():
        out.update(sub_products)
    return tuple(out)


def entitlements(subscriptions: Iterable[Subscription], unpaid: Iterable[tuple[Invoice, Level]],
                 policy: Policy, billed: Iterable[str] = ()) -> dict[str, Any]:
    """Every product the account has, at the access its unpaid invoices' levels allow; products
    on no unpaid invoice keep full access (an annual product already paid stays untouched).
    ``billed``: the products only its invoices show (``billed_products``), the account's as well."""
    products: dict[str, Access] = {}
    subscriptions = list(subscriptions)
    for sub in subscriptions:
        if sub.status not in NOT_PROVISIONED:
            for product in sub.products:
                products.setdefault(product, Access.FULL)
    for product in billed:
        products.setdefault(product, Access.FULL)
    # A subscription canceled (or expired) while its invoice is unpaid grants nothing any more: its
    # products are revoked, not the level's access (full at notice would give back, to a customer who
    # did not pay, what the cancellation ended). Nor does one not started or paused (NOT_PROVISIONED):
    # its first invoice failing is no reason to grant it. A product another, active subscription also
    # carries keeps that one's access under the level, as does the product of an invoice of no
    # subscription or of one the snapshot does not know.
    ended = {sub.id for sub in subscriptions if sub.status in NOT_PROVISIONED}
    known = {sub.id for sub in subscriptions}
    active = set(products)
    dropped: set[str] = set()
    unpaid = list(unpaid)
    for invoice, level in unpaid:
        for product in invoice.products:
            if invoice.subscription_id in known and product not in active:
                dropped.add(product)
            if invoice.subscription_id in ended and product not in active:
                allowed = Access.REVOKED
            else:
                allowed = (upgrade_access(level, invoice, product) if invoice.is_upgrade
                           else access(level, policy.tier(product)))
            current = products.get(product, Access.FULL)
            products[product] = max(current, allowed, key=ACCESS_SEVERITY.index)
    # An unpaid swap keeps what the customer held before it (premium_off: core kept), and no more than
    # that: the plan it replaced may be on an unpaid regular invoice too (a renewal read-only at
    # limited, revoked in bad debt), and upgrading must not give that access back. Invoices are
    # oldest first, so a swap of a swapped-in product inherits in turn. Not while the upgrade's
    # lines are not all known: a product it credits on a later line was held before, and read from
    # the first lines it may look like the replacement of another (as upgrade_access withholds
    # nothing then, nothing is passed on).
    for invoice, _level in unpaid:
        if invoice.is_upgrade and not invoice.lines_incomplete:
            for product, held in _replaced(invoice).items():
                products[product] = max((products[product], *(products.get(p, Access.FULL) for p in held)),
                                        key=ACCESS_SEVERITY.index)
    # A product of a known subscription that no provisioned subscription carries any more (an add-on
    # removed, a plan downgraded or moved away while its invoice is unpaid) is not the customer's:
    # revoked, as the product of an ended subscription is, never granted at the level's access (full
    # at notice) only for as long as its invoice stays unpaid, to be taken away once it is paid
    # (full_entitlements: a known subscription's items decide its products). After the swaps above
    # inherited its access: a plan an unpaid upgrade swapped out still limits what replaced it. Not a
    # product an unpaid upgrade credits: what the customer held before an upgrade they have not
    # paid for is kept (DESIGN 4: only the upgraded entitlements are withheld).
    held_before = {p for invoice, _level in unpaid if invoice.is_upgrade for p in invoice.credited_products}
    for product in dropped - held_before:
        products[product] = Access.REVOKED
    plan_changes = not any(level.rank >= Level.LIMITED.rank and not invoice.is_upgrade for invoice, level in unpaid)
    return {"products": {p: products[p].value for p in sorted(products)}, "plan_changes": plan_changes}


def full_entitlements(subscriptions: Iterable[Subscription], billed: Iterable[str] = ()) -> dict[str, Any]:
    """``entitlements`` with nothing unpaid: every product of a provisioned subscription (not
    NOT_PROVISIONED), and every one only the invoices show (``billed``), in full."""
    products: dict[str, None] = {}
    for sub in subscriptions:
        if sub.status not in NOT_PROVISIONED:
            for product in sub.products:
                products[product] = None
    for product in billed:
        products[product] = None
    return {"products": {p: Access.FULL.value for p in sorted(products)}, "plan_changes": True}
