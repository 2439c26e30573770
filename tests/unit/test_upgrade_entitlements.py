"""An unpaid upgrade withholds only what it added: never access the customer held before it.

Stripe bills an upgrade (billing_reason subscription_update) with a proration credit for the unused
time of what the subscription held (a negative line) and a charge for what it holds now."""

from __future__ import annotations

from dataclasses import replace

from app.domain.compute import compute
from app.domain.snapshot import InvoiceLine, Subscription
from app.domain.state import Level
from tests.unit.builders import NOW, attempt, invoice, policy, snapshot

POLICY = policy()


def unpaid_upgrade_entitlements(lines: tuple[InvoiceLine, ...], *products: str, days_unpaid: float = 8) -> dict:
    upgrade = replace(invoice("in_up", failed_days_ago=days_unpaid, billing_reason="subscription_update"),
                      lines=lines)
    snap = snapshot(upgrade, subscriptions=(Subscription("sub_1", "active", products),),
                    attempts=(attempt("pi_up", "in_up", days_ago=days_unpaid),))
    decision = compute(snap, POLICY, NOW)
    assert decision.state.level == Level.RESTRICT_PREMIUM.value and not decision.bad_debt
    return dict(decision.state.entitlements["products"])


def test_an_unpaid_seat_increase_keeps_the_product_already_held():
    # 2 -> 5 seats of core: credit for 2 seats' unused time, charge for 5 seats' remaining time.
    lines = (InvoiceLine("prod_core", -2000), InvoiceLine("prod_core", 5000))
    assert unpaid_upgrade_entitlements(lines, "prod_core") == {"prod_core": "full"}


def test_an_unpaid_seat_increase_of_a_premium_product_keeps_it():
    lines = (InvoiceLine("prod_premium", -2000), InvoiceLine("prod_premium", 5000))
    assert unpaid_upgrade_entitlements(lines, "prod_core", "prod_premium") == {
        "prod_core": "full", "prod_premium": "full"}


def test_an_unpaid_swap_from_core_to_premium_keeps_core_and_withholds_premium():
    # The subscription now lists premium only: core access stays, premium features are off.
    lines = (InvoiceLine("prod_core", -2000), InvoiceLine("prod_premium", 6000))
    assert unpaid_upgrade_entitlements(lines, "prod_premium") == {"prod_premium": "premium_off"}


def test_an_unpaid_seat_increase_with_a_new_add_on_withholds_the_add_on_only():
    lines = (InvoiceLine("prod_core", -2000), InvoiceLine("prod_core", 5000),
             InvoiceLine("prod_premium_analytics", 2500))
    assert unpaid_upgrade_entitlements(lines, "prod_core", "prod_premium_analytics") == {
        "prod_core": "full", "prod_premium_analytics": "withheld"}


def test_an_unpaid_add_on_is_withheld():
    lines = (InvoiceLine("prod_premium_analytics", 2500),)
    assert unpaid_upgrade_entitlements(lines, "prod_core", "prod_premium_analytics") == {
        "prod_core": "full", "prod_premium_analytics": "withheld"}


def test_an_unpaid_regular_invoice_of_the_swapped_product_still_takes_its_own_toll():
    # The swap keeps core; a regular invoice for the new plan unpaid 15 days (limited) revokes it.
    swap = replace(invoice("in_up", failed_days_ago=8, billing_reason="subscription_update"),
                   lines=(InvoiceLine("prod_core", -2000), InvoiceLine("prod_premium", 6000)))
    regular = invoice("in_cycle", failed_days_ago=15, product="prod_premium")
    snap = snapshot(swap, regular, subscriptions=(Subscription("sub_1", "active", ("prod_premium",)),),
                    attempts=(attempt("pi_up", "in_up", days_ago=8), attempt("pi_c", "in_cycle", days_ago=15)))
    assert compute(snap, POLICY, NOW).state.entitlements["products"] == {"prod_premium": "revoked"}


def test_a_new_add_on_bought_with_a_swap_is_withheld():
    # core -> premium on the same subscription item (si_plan), and a new add-on item: only the plan
    # was swapped in; the add-on is new and stays withheld until paid.
    lines = (InvoiceLine("prod_core", -2000, "si_plan"), InvoiceLine("prod_premium", 6000, "si_plan"),
             InvoiceLine("prod_premium_analytics", 2500, "si_addon"))
    assert unpaid_upgrade_entitlements(lines, "prod_premium", "prod_premium_analytics") == {
        "prod_premium": "premium_off", "prod_premium_analytics": "withheld"}


def test_more_new_products_than_dropped_ones_without_items_withholds_them_all():
    # Lines that do not say their subscription item: one product dropped, two added. Which one
    # replaced it cannot be told, so neither is taken for the plan (an add-on is never let through).
    lines = (InvoiceLine("prod_core", -2000), InvoiceLine("prod_premium", 6000),
             InvoiceLine("prod_premium_analytics", 2500))
    assert unpaid_upgrade_entitlements(lines, "prod_premium", "prod_premium_analytics") == {
        "prod_premium": "withheld", "prod_premium_analytics": "withheld"}


def test_a_swap_by_a_new_item_with_nothing_added_beside_it_is_still_a_swap():
    # Stripe swaps by deleting the old item and adding a new one too: one dropped, one added.
    lines = (InvoiceLine("prod_core", -2000, "si_old"), InvoiceLine("prod_premium", 6000, "si_new"))
    assert unpaid_upgrade_entitlements(lines, "prod_premium") == {"prod_premium": "premium_off"}
