"""A new subscription Stripe has not started yet (``incomplete``: created with
``payment_behavior=default_incomplete``, its first payment not confirmed) is not provisioned: the
entitlements sent whole to Account Management do not grant its product, and once the customer pays
and Stripe makes it active they grant it in full. Through the signed webhooks, real recomputes and
the outbox relay against the fake Account Management."""

from __future__ import annotations

import time
from typing import Any

from app.outbox.relay import relay
from tests.conftest import post_event
from tests.integration.bad_debt_setup import recompute
from tests.integration.test_journeys_journeys import invoice_event
from tests.stripe_events import event, unique


def subscription(customer: str, sub: str, status: str, before: str | None, at: int) -> dict[str, Any]:
    evt = event("customer.subscription.updated", created=at, id=sub, customer=customer, status=status,
                paths={"items.data.0.price.product": "prod_premium"})
    previous: dict[str, Any] = {"status": before} if before else {"metadata": {}}
    evt["data"]["previous_attributes"] = previous
    return evt


def test_an_incomplete_subscription_grants_its_product_only_once_paid(client, accounts, engine, runtime, fake_am):
    account, customer = accounts.create()
    sub, first, now = unique("sub"), unique("in"), int(time.time())
    assert post_event(client, subscription(customer, sub, "incomplete", None, now - 120)).status_code == 200
    assert recompute(engine, runtime, account)["status"] == "current"
    relay(engine, fake_am.url)
    assert fake_am.entitlements(account)[-1].body["entitlements"]["products"] == {}

    # The customer confirms the payment: its first invoice paid, the subscription active.
    paid = invoice_event("invoice.paid", customer, first, now - 30, paid=5000, product="prod_premium",
                         reason="subscription_create", created=now - 120)
    paid["data"]["object"]["parent"]["subscription_details"]["subscription"] = sub
    assert post_event(client, paid).status_code == 200
    assert post_event(client, subscription(customer, sub, "active", "incomplete", now - 30)).status_code == 200
    assert recompute(engine, runtime, account)["status"] == "current"
    relay(engine, fake_am.url)
    assert fake_am.entitlements(account)[-1].body["entitlements"] == {"products": {"prod_premium": "full"},
                                                                      "plan_changes": True}


def test_a_subscription_paused_and_resumed_through_its_own_events(client, accounts, engine, runtime, fake_am):
    """Stripe's pause (API 2026-09-30: on demand, after a payment failure, or a trial ended with no
    payment method) is reported by customer.subscription.paused and .resumed, which carry the
    subscription: they are mirrored and recomputed like its updates."""
    account, customer = accounts.create()
    sub, now = unique("sub"), int(time.time())
    assert post_event(client, subscription(customer, sub, "active", None, now - 300)).status_code == 200
    assert recompute(engine, runtime, account)["status"] == "current"
    relay(engine, fake_am.url)
    assert fake_am.entitlements(account)[-1].body["entitlements"]["products"] == {"prod_premium": "full"}

    paused = subscription(customer, sub, "paused", "active", now - 200)
    paused["type"] = "customer.subscription.paused"
    assert post_event(client, paused).status_code == 200
    recompute(engine, runtime, account)
    relay(engine, fake_am.url)
    assert fake_am.entitlements(account)[-1].body["entitlements"]["products"] == {}

    resumed = subscription(customer, sub, "active", "paused", now - 100)
    resumed["type"] = "customer.subscription.resumed"
    assert post_event(client, resumed).status_code == 200
    recompute(engine, runtime, account)
    relay(engine, fake_am.url)
    assert fake_am.entitlements(account)[-1].body["entitlements"]["products"] == {"prod_premium": "full"}
