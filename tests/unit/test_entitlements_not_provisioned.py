"""A subscription Stripe has not started (``incomplete``: its first payment not made yet, the usual
state of every new subscription created with ``payment_behavior=default_incomplete`` until the
customer confirms the payment) or has paused (``paused``: its trial ended with no payment method)
is not provisioned: its products are not in the entitlements sent whole to Account Management, which
would otherwise grant a product nobody paid for (an abandoned checkout kept it for the 23 hours
until Stripe expires the subscription). Its first invoice failing takes nothing the customer had.
A product another, provisioned subscription also carries keeps that one's access; the subscription
active again gives its products back in full."""

from __future__ import annotations

from dataclasses import replace

import pytest

from app.domain.compute import compute
from app.domain.snapshot import Subscription
from tests.unit.builders import NOW, attempt, invoice, policy, snapshot

POLICY = policy()
CORE = Subscription("sub_1", "active", ("prod_core",))


def products(snap) -> dict[str, str]:
    return dict(compute(snap, POLICY, NOW).state.entitlements["products"])


@pytest.mark.parametrize("status", ["incomplete", "paused"])
def test_a_subscription_not_started_or_paused_grants_nothing(status):
    paid = invoice("in_core", status="paid", failed_days_ago=None)
    # its first invoice, finalized and not paid yet (no attempt failed: nothing is owed yet)
    first = replace(invoice("in_new", failed_days_ago=None, product="prod_premium", sub="sub_2",
                            billing_reason="subscription_create"), attempt_count=0)
    snap = snapshot(paid, first, subscriptions=(CORE, Subscription("sub_2", status, ("prod_premium",))))
    decision = compute(snap, POLICY, NOW)
    assert decision.state.status == "current"
    assert products(snap) == {"prod_core": "full"}


def test_the_first_invoice_of_an_incomplete_subscription_failing_grants_nothing_and_takes_nothing():
    first = invoice("in_new", failed_days_ago=0.1, product="prod_premium", sub="sub_2",
                    billing_reason="subscription_create")
    snap = snapshot(first, attempts=(attempt("pi_new", "in_new", days_ago=0.1),),
                    subscriptions=(CORE, Subscription("sub_2", "incomplete", ("prod_premium",))))
    decision = compute(snap, POLICY, NOW)
    assert (decision.state.status, decision.state.level) == ("past_due", "notice")
    # at notice a product of a started subscription keeps full access; this one was never the customer's
    assert products(snap) == {"prod_core": "full", "prod_premium": "revoked"}


def test_a_product_a_provisioned_subscription_also_carries_keeps_its_access():
    subs = (Subscription("sub_1", "active", ("prod_core", "prod_premium")),
            Subscription("sub_2", "incomplete", ("prod_premium",)))
    assert products(snapshot(invoice("in_core", status="paid", failed_days_ago=None), subscriptions=subs)) == {
        "prod_core": "full", "prod_premium": "full"}


def test_the_subscription_active_gives_its_products_in_full():
    paid = invoice("in_new", status="paid", failed_days_ago=None, product="prod_premium", sub="sub_2",
                   billing_reason="subscription_create")
    snap = snapshot(paid, subscriptions=(CORE, Subscription("sub_2", "active", ("prod_premium",))))
    assert products(snap) == {"prod_core": "full", "prod_premium": "full"}
