"""The same card added again under a new payment method id (Stripe's card.fingerprint says so) is no
new method: after a stolen_card decline it earns no immediate retry, end to end from the webhooks
(mirror -> gather -> compute). Another card does."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from app.recompute.service import run_recompute
from tests.conftest import Accounts, post_event, service_headers
from tests.stripe_events import event, unique, with_product

DAY = 86400


def declined_then_added(client, customer: str, fingerprint: str) -> str:
    """in_: declined stolen_card on a card two days ago; then a card of ``fingerprint`` attached and made
    the default. Returns the new payment method's id."""
    t = int(time.time()) - 2 * DAY
    first = unique("pm")
    attached = event("payment_method.attached", id=first, customer=customer, created=t - DAY,
                     paths={"card.exp_month": 12, "card.exp_year": 2030, "card.fingerprint": "fp_same"})
    assert post_event(client, attached).status_code == 200
    failed = event("invoice.payment_failed", id=unique("in"), customer=customer, created=t, amount_due=5000,
                   amount_remaining=5000, amount_paid=0, attempt_count=1, billing_reason="subscription_cycle",
                   paths={"created": t - DAY})
    assert post_event(client, with_product(failed, "prod_core", 5000)).status_code == 200
    charge = event("charge.failed", id=unique("ch"), customer=customer, payment_intent=unique("pi"),
                   payment_method=first, failure_code="card_declined", created=t + 1,
                   paths={"created": t + 1, "outcome.reason": "stolen_card"})
    assert post_event(client, charge).status_code == 200
    card = unique("pm")
    now = int(time.time()) - 60
    again = event("payment_method.attached", id=card, customer=customer, created=now,
                  paths={"card.exp_month": 12, "card.exp_year": 2030, "card.fingerprint": fingerprint})
    assert post_event(client, again).status_code == 200
    default = event("customer.updated", id=customer, created=now,
                    paths={"invoice_settings.default_payment_method": card})
    default["data"]["previous_attributes"] = {"invoice_settings": {"default_payment_method": first}}
    assert post_event(client, default).status_code == 200
    return card


def decided(client, engine, runtime, account: str) -> dict:
    run_recompute(engine, runtime.policy, account, "MANUAL", datetime.now(UTC))
    response = client.get(f"/accounts/{account}/dunning", headers=service_headers())
    assert response.status_code == 200
    return response.json


def test_the_stolen_card_added_again_earns_no_immediate_retry(client, engine, runtime, accounts: Accounts):
    account, customer = accounts.create()
    declined_then_added(client, customer, "fp_same")
    state = decided(client, engine, runtime, account)
    assert state["failure_class"] == "permanent"
    assert state["next_retry_at"] is None
    assert "retry.none_permanent" in [r["rule"] for r in state["reasons"]]


def test_another_card_earns_it(client, engine, runtime, accounts: Accounts):
    account, customer = accounts.create()
    card = declined_then_added(client, customer, "fp_other")
    state = decided(client, engine, runtime, account)
    assert state["next_retry_at"] is not None
    assert "retry.new_method" in [r["rule"] for r in state["reasons"]]
    assert any(r["facts"].get("payment_method") == card for r in state["reasons"] if r["rule"] == "retry.new_method")
