"""A product of a known subscription that no provisioned subscription carries any more, billed by an
unpaid invoice, is revoked in the entitlements (never granted at the level's access only while the
invoice stays unpaid, to disappear once it is paid). What an unpaid upgrade credits (the plan held
before it) is kept; a product another subscription carries keeps that one's access."""

from __future__ import annotations

from dataclasses import replace

from app.domain.compute import compute
from app.domain.snapshot import InvoiceLine, Subscription
from tests.unit.builders import NOW, attempt, invoice, policy, snapshot

POLICY = policy()


def products(snap) -> dict[str, str]:
    return dict(compute(snap, POLICY, NOW).state.entitlements["products"])


def upgrade(failed_days_ago: float):
    return replace(invoice("in_up", failed_days_ago=failed_days_ago, product="prod_premium",
                           billing_reason="subscription_update"),
                   lines=(InvoiceLine("prod_core", -1000, "si_1"), InvoiceLine("prod_premium", 3000, "si_1")))


def test_an_add_on_removed_while_its_invoice_is_unpaid_is_revoked():
    renewal = invoice("in_1", failed_days_ago=1, product="prod_addon")
    snap = snapshot(renewal, attempts=(attempt("pi_1", "in_1", days_ago=1),),
                    subscriptions=(Subscription("sub_1", "active", ("prod_core",)),))
    assert compute(snap, POLICY, NOW).state.level == "notice"
    assert products(snap) == {"prod_core": "full", "prod_addon": "revoked"}
    paid = invoice("in_1", status="paid", failed_days_ago=None, product="prod_addon")
    assert products(snapshot(paid, subscriptions=(Subscription("sub_1", "active", ("prod_core",)),))) == {
        "prod_core": "full"}


def test_an_upgrade_downgraded_before_it_was_paid_grants_nothing_of_it():
    snap = snapshot(upgrade(10), attempts=(attempt("pi_up", "in_up", days_ago=10),),
                    subscriptions=(Subscription("sub_1", "active", ("prod_core",)),))
    assert products(snap) == {"prod_core": "full", "prod_premium": "revoked"}


def test_an_unpaid_upgrade_keeps_the_plan_it_swapped_out():
    renewal = invoice("in_ren", failed_days_ago=1, product="prod_core")
    snap = snapshot(renewal, upgrade(1), attempts=(attempt("pi_ren", "in_ren", days_ago=1),
                                                   attempt("pi_up", "in_up", days_ago=1)),
                    subscriptions=(Subscription("sub_1", "active", ("prod_premium",)),))
    assert products(snap) == {"prod_core": "full", "prod_premium": "full"}


def test_a_product_moved_to_another_subscription_keeps_that_ones_access():
    renewal = invoice("in_1", failed_days_ago=1, product="prod_addon")
    subs = (Subscription("sub_1", "active", ("prod_core",)), Subscription("sub_2", "active", ("prod_addon",)))
    assert products(snapshot(renewal, attempts=(attempt("pi_1", "in_1", days_ago=1),), subscriptions=subs)) == {
        "prod_core": "full", "prod_addon": "full"}
