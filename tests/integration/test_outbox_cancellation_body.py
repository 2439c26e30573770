"""One cancellation request, one body: the relay sends a bad-debt episode's cancellation under one
Idempotency-Key (per subscription and episode), so everything in its body must be fixed by that
episode. Its reason is the episode's, set when the episode opened, not the reason the decision of
the moment gives (an invoice marked uncollectible later in the episode changes that one)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine

from app.outbox.relay import relay
from app.recompute.service import RecomputeResult, run_recompute
from app.runtime import Runtime
from tests.conftest import post_event
from tests.stripe_events import event, unique, with_product

DAY = 86400


def failed_invoice(customer: str, invoice: str, at: int) -> dict[str, Any]:
    evt = event("invoice.payment_failed", id=invoice, customer=customer, created=at, attempt_count=1,
                billing_reason="subscription_cycle", amount_due=5000, amount_remaining=5000,
                paths={"created": at - 3600})
    return with_product(evt, "prod_core", 5000)


def declined_charge(customer: str, at: int, decline: str) -> dict[str, Any]:
    return event("charge.failed", id=unique("ch"), customer=customer, payment_intent=unique("pi"),
                 payment_method="card_old", failure_code="card_declined", created=at,
                 paths={"created": at, "outcome.reason": decline})


def marked_uncollectible(customer: str, invoice: str, created_at: int) -> dict[str, Any]:
    evt = event("invoice.marked_uncollectible", id=invoice, customer=customer, created=int(time.time()) - 60,
                amount_due=5000, amount_remaining=5000, amount_paid=0, total=5000, attempt_count=1,
                paths={"created": created_at})
    return with_product(evt, "prod_core", 5000)


def recompute(engine: Engine, runtime: Runtime, account: str) -> RecomputeResult:
    return run_recompute(engine, runtime.policy, account, "STATE_REFRESH", datetime.now(UTC))


def test_a_cancellation_requested_again_in_its_episode_carries_the_episodes_reason(
        client, accounts, engine, runtime, fake_am):
    """Rule: the body of a cancellation depends only on what its key covers (account, subscription,
    episode). Entered as retries_exhausted, marked uncollectible since, lifted by a bad-debt payment
    that then fails: the cancellation requested again is the first one, body included. (With the
    decision's reason, marked_uncollectible, an Account Management with Stripe-style idempotency
    refuses the reused key with a 4xx, and the relay retries it forever, blocking the account.)"""
    account, customer = accounts.create()
    invoice, t0 = unique("in"), int(time.time()) - 25 * DAY
    assert post_event(client, failed_invoice(customer, invoice, t0)).status_code == 200
    assert post_event(client, declined_charge(customer, t0 + 1, "expired_card")).status_code == 200
    entered = recompute(engine, runtime, account)
    assert entered.decision is not None and entered.decision.bad_debt_reason == "retries_exhausted"
    assert relay(engine, fake_am.url).failed == 0

    # Stripe's own dunning ends by marking the invoice uncollectible: the decision's reason changes.
    assert post_event(client, marked_uncollectible(customer, invoice, t0 - 3600)).status_code == 200
    still = recompute(engine, runtime, account)
    assert still.decision is not None and still.decision.bad_debt_reason == "marked_uncollectible"

    # A bad-debt payment in flight takes the cancellation away; its failure asks for it again.
    with engine.begin() as conn:
        payment = conn.exec_driver_sql(
            "INSERT INTO bad_debt_payment (account_id, idempotency_key, request_fingerprint, amount) "
            "VALUES (%(a)s, %(k)s, 'fp', 5000) RETURNING id", {"a": account, "k": unique("key")}).scalar_one()
    assert recompute(engine, runtime, account).outcome == "changed"
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE bad_debt_payment SET state = 'failed', failure_reason = 'card_declined', "
                             "updated_at = now() WHERE id = %(id)s", {"id": payment})
    again = recompute(engine, runtime, account)
    assert again.decision is not None and again.decision.state.status == "bad_debt"
    assert relay(engine, fake_am.url).failed == 0

    first, second = [r for r in fake_am.for_account(account) if r.kind == "cancellations"]
    assert first.idempotency_key == second.idempotency_key  # one logical request, never two cancellations
    assert first.body == second.body
    assert second.body["reason"] == "retries_exhausted"  # the episode's, as its BadDebtEntered said
