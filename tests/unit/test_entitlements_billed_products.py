"""A product that only the account's invoices show (an invoice of no subscription, or of a subscription
the mirror does not know) is the account's whether the invoice is paid or not.

Entitlements are sent whole (PUT /accounts/<id>/entitlements): a product restricted while its invoice
was unpaid, and missing from the entitlements once it is paid, is one Account Management may take
away from a customer who has just paid for it, instead of giving it back in full."""

from __future__ import annotations

from dataclasses import replace

import pytest

from app.domain.compute import compute
from app.domain.snapshot import InvoiceLine, Subscription
from tests.unit.builders import NOW, attempt, days, invoice, policy, snapshot

POLICY = policy()
CORE = (Subscription("sub_1", "active", ("prod_core",)),)


def paid(inv):
    return replace(inv, status="paid", amount_paid=inv.amount_due, amount_remaining=0, paid_at=NOW)


@pytest.mark.parametrize("sub", [None, "sub_unknown"], ids=["no_subscription", "unknown_subscription"])
def test_a_product_known_only_from_its_invoice_comes_back_in_full_once_paid(sub):
    addon = replace(invoice("in_addon", failed_days_ago=15, product="prod_addon"), subscription_id=sub)
    unpaid = compute(snapshot(addon, subscriptions=CORE,
                              attempts=(attempt("pi_1", "in_addon", days_ago=15),)), POLICY, NOW)
    assert unpaid.state.entitlements["products"] == {"prod_addon": "read_only", "prod_core": "full"}

    settled = compute(snapshot(paid(addon), subscriptions=CORE), POLICY, NOW)
    assert settled.state.entitlements["products"] == {"prod_addon": "full", "prod_core": "full"}
    # The same with another invoice still unpaid (compute's full path, not the nothing-unpaid one).
    core = invoice("in_core", failed_days_ago=1)
    both = compute(snapshot(paid(addon), core, subscriptions=CORE,
                            attempts=(attempt("pi_2", "in_core", days_ago=1),)), POLICY, NOW)
    assert both.state.entitlements["products"] == {"prod_addon": "full", "prod_core": "full"}


def test_an_unknown_subscriptions_products_are_those_its_latest_invoices_bill():
    """Its latest invoice that is no upgrade bills every item; the upgrades since add and swap."""
    from app.domain.entitlements import billed_products

    first = replace(invoice("in_1", status="paid", failed_days_ago=None, sub="sub_x"), created=days(60),
                    lines=(InvoiceLine("prod_core", 1000), InvoiceLine("prod_addon", 500)))
    renewal = replace(invoice("in_2", status="paid", failed_days_ago=None, sub="sub_x"), created=days(30))
    swap = replace(invoice("in_3", status="paid", failed_days_ago=None, sub="sub_x",
                           billing_reason="subscription_update"), created=days(10),
                   lines=(InvoiceLine("prod_core", -400), InvoiceLine("prod_premium", 900)))
    addon = replace(invoice("in_4", status="paid", failed_days_ago=None, sub="sub_x",
                            billing_reason="subscription_update"), created=days(5),
                    lines=(InvoiceLine("prod_seats", -100), InvoiceLine("prod_seats", 300),
                           InvoiceLine("prod_extra", 200)))
    assert billed_products((), [first]) == ("prod_core", "prod_addon")
    assert billed_products((), [renewal, first]) == ("prod_core",)  # the add-on was dropped at renewal
    assert billed_products((), [first, renewal, swap]) == ("prod_premium",)
    assert set(billed_products((), [first, renewal, swap, addon])) == {"prod_premium", "prod_seats", "prod_extra"}
    # Known subscriptions speak for themselves (an ended one grants nothing); draft and void bill nothing.
    assert billed_products((Subscription("sub_x", "canceled", ()),), [first, renewal]) == ()
    one_off_draft = replace(renewal, status="draft", subscription_id=None)
    assert billed_products((), [replace(first, status="void"), one_off_draft]) == ()
    # A renewal whose lines are not all known adds what it shows, and takes nothing away.
    assert billed_products((), [first, replace(renewal, lines_incomplete=True)]) == ("prod_core", "prod_addon")


def test_billed_products_keep_the_put_the_same_whatever_the_order_of_the_invoices():
    one_off = replace(invoice("in_a", status="paid", failed_days_ago=None, product="prod_book"), subscription_id=None)
    other = replace(invoice("in_b", status="paid", failed_days_ago=None, product="prod_course"), subscription_id=None)
    forward = compute(snapshot(one_off, other, subscriptions=CORE), POLICY, NOW)
    backward = compute(snapshot(other, one_off, subscriptions=CORE), POLICY, NOW)
    assert forward.state.entitlements == backward.state.entitlements == {
        "products": {"prod_book": "full", "prod_core": "full", "prod_course": "full"}, "plan_changes": True}
