"""Whole customer journeys through the signed webhook, the real broker and a real worker: the end
state an operator (GET /accounts/<id>/dunning, /billing-history) and Account Management (the outbox)
see."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import Accounts, post_event, wait_for
from tests.integration.journey_views import dunning, labels, outbox, support_recompute
from tests.stripe_events import event, unique, with_product

pytestmark = pytest.mark.worker
DAY = 86400


def invoice_event(kind: str, customer: str, invoice: str, at: int, *, amount: int = 5000, paid: int = 0,
                  reason: str = "subscription_cycle", product: str = "prod_core", attempts: int = 1,
                  created: int | None = None) -> dict[str, Any]:
    status = {"invoice.paid": "paid", "invoice.marked_uncollectible": "uncollectible",
              "invoice.voided": "void"}.get(kind, "open")
    evt = event(kind, id=invoice, customer=customer, created=at, attempt_count=attempts, billing_reason=reason,
                amount_due=amount, amount_paid=paid, amount_remaining=amount - paid, status=status,
                paths={"created": created if created is not None else at - 3600})
    return with_product(evt, product, amount)


def charge_failed(customer: str, at: int, decline: str) -> dict[str, Any]:
    return event("charge.failed", id=unique("ch"), customer=customer, payment_intent=unique("pi"),
                 payment_method="card_old", failure_code="card_declined", created=at,
                 paths={"created": at, "outcome.reason": decline})


def settled(client: Any, account: str, predicate: Any, message: str) -> dict[str, Any]:
    return wait_for(lambda: (s := dunning(client, account)) and predicate(s) and s, message=message)


def test_upgrade_marked_uncollectible_while_the_base_is_paid_never_reaches_bad_debt(
        client, accounts: Accounts, engine, worker):
    account, customer = accounts.create()
    t0 = int(time.time()) - 40 * DAY
    base, upgrade = unique("in"), unique("in")
    post_event(client, invoice_event("invoice.paid", customer, base, t0, paid=5000))
    post_event(client, invoice_event("invoice.payment_failed", customer, upgrade, t0 + DAY, amount=2500,
                                     reason="subscription_update", product="prod_premium_analytics"))
    post_event(client, charge_failed(customer, t0 + DAY + 1, "insufficient_funds"))
    settled(client, account, lambda s: s["status"] == "past_due", "upgrade unpaid")
    # Stripe's dunning settings mark the unpaid upgrade uncollectible at the end of its retries.
    post_event(client, invoice_event("invoice.marked_uncollectible", customer, upgrade, t0 + 30 * DAY,
                                     amount=2500, reason="subscription_update", product="prod_premium_analytics",
                                     created=t0 + DAY - 3600))
    state = settled(client, account, lambda s: "UpgradeRevertRequested" in outbox(engine, account),
                    "upgrade reverted")
    state = dunning(client, account)
    assert state["bad_debt"] is False and state["status"] != "bad_debt", state
    events = outbox(engine, account)
    assert "BadDebtEntered" not in events and "CancellationRequested" not in events, events
    assert state["entitlements"]["products"].get("prod_core") in (None, "full"), state["entitlements"]


def test_two_invoices_failing_on_different_days_the_older_paid_leaves_the_newer_level(
        client, accounts: Accounts, engine, worker):
    account, customer = accounts.create()
    now = int(time.time())
    old, new = unique("in"), unique("in")
    post_event(client, invoice_event("invoice.payment_failed", customer, old, now - 16 * DAY))
    post_event(client, charge_failed(customer, now - 16 * DAY + 1, "insufficient_funds"))
    post_event(client, invoice_event("invoice.payment_failed", customer, new, now - 2 * DAY))
    post_event(client, charge_failed(customer, now - 2 * DAY + 1, "insufficient_funds"))
    state = settled(client, account, lambda s: s["level"] == "limited", "16 days unpaid: limited")
    assert labels(client, account) == {old: "Past due", new: "Past due"}

    post_event(client, invoice_event("invoice.paid", customer, old, now, paid=5000, created=now - 16 * DAY - 3600))
    state = settled(client, account, lambda s: s["level"] == "notice", "only the 2-day invoice left")
    assert state["status"] == "past_due" and state["bad_debt"] is False
    assert labels(client, account) == {old: "Paid", new: "Past due"}
    assert "ConsequenceEased" in outbox(engine, account)


def test_out_of_order_and_duplicate_deliveries_end_paid(client, accounts: Accounts, engine, worker):
    account, customer = accounts.create()
    now = int(time.time())
    invoice = unique("in")
    failed = invoice_event("invoice.payment_failed", customer, invoice, now - 5 * DAY)
    charge = charge_failed(customer, now - 5 * DAY + 1, "insufficient_funds")
    paid = invoice_event("invoice.paid", customer, invoice, now - DAY, paid=5000, attempts=2,
                         created=now - 5 * DAY - 3600)
    for evt in (paid, failed, charge, paid, failed, charge):
        assert post_event(client, evt).status_code == 200
    state = settled(client, account, lambda s: s["status"] == "current", "paid whatever the order")
    # Once the deliveries have settled, another full recompute changes nothing (DESIGN 1).
    version = support_recompute(client, account)["version"]
    assert support_recompute(client, account)["version"] == version
    assert state["level"] == "none" and state["bad_debt"] is False
    assert labels(client, account) == {invoice: "Paid"}
    assert dunning(client, account)["version"] == version
    assert "BadDebtEntered" not in outbox(engine, account)


def test_subscription_cancelled_by_the_customer_mid_dunning(client, accounts: Accounts, engine, worker):
    account, customer = accounts.create()
    now = int(time.time())
    invoice = unique("in")
    post_event(client, invoice_event("invoice.payment_failed", customer, invoice, now - 8 * DAY))
    post_event(client, charge_failed(customer, now - 8 * DAY + 1, "insufficient_funds"))
    settled(client, account, lambda s: s["level"] == "restrict_premium", "8 days: restrict_premium")
    cancelled = event("customer.subscription.deleted", customer=customer, created=now - 60)
    assert post_event(client, cancelled).status_code == 200
    # Stripe voids nothing on a cancel: the open invoice is still owed, unless the merchant voids it.
    post_event(client, invoice_event("invoice.voided", customer, invoice, now - 30, created=now - 8 * DAY - 3600))
    state = settled(client, account, lambda s: s["status"] == "current", "voided after the cancel")
    assert state["level"] == "none" and state["bad_debt"] is False
    assert labels(client, account) == {invoice: "Resolved"}
    events = outbox(engine, account)
    assert "CancellationRequested" not in events and "BadDebtEntered" not in events
