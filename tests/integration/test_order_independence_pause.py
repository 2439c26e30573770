"""Property: the final state does not depend on the order Stripe delivers an account's events in,
nor on redeliveries, in journeys that combine the subscription's own pause and resumption
(customer.subscription.paused / .resumed), a pause of its payment collection (pause_collection
mark_uncollectible: its invoices finalized and marked uncollectible, never attempted, no debt), a
downgrade removing a product while the invoice that billed it is unpaid, and invoice_payment.paid
(timed by its status_transitions.paid_at) racing invoice.paid and payment_intent.succeeded for a
customer at or near bad debt, with the failures, retries and endings of
test_order_independence_events.py.

Each history goes, as there, to three accounts through the real webhook endpoint (signed, verified)
and database: in Stripe's order recomputed after every delivery, shuffled with redeliveries
recomputed after every delivery, and shuffled with redeliveries recomputed once. subs_dunning
(status, level, failure class, next retry, outstanding, entitlements as the relay sends them, ...),
the bad-debt flag, the mirror rows and the billing-history labels must be equal; a recompute right
after any recompute writes and emits nothing. What is not compared, and why, is as there.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from tests.conftest import Accounts
from tests.integration import test_order_independence_events as base
from tests.integration.test_order_independence_events import (
    DAY,
    DECLINES,
    Step,
    differences,
    in_stripe_order,
)
from tests.stripe_events import resource

# The fixture subscription's own pause of collection: {"behavior": "mark_uncollectible", ...}.
PAUSED = resource("subscription")["pause_collection"]
ENDINGS = ["open", "paid", "uncollectible", "uncollectible_then_paid"]


@st.composite
def journeys(draw: Any) -> list[Step]:
    """An account's events in Stripe's order; ids are templates (see test_order_independence_events)."""
    steps: list[Step] = []
    start = int(time.time()) - 60 * DAY
    plan = "prod_premium"
    steps.append((start, "payment_method.attached", {"pm": "pm0"}))
    steps.append((start, "customer.updated", {"pm": "pm0", "changed": True}))
    steps.append((start, "customer.subscription.updated", {"status": "active", "product": plan}))
    t = start
    if draw(st.booleans()):
        # The merchant pauses collection (mark_uncollectible); an invoice made meanwhile is finalized
        # and marked uncollectible at once, never attempted; the pause lifted later.
        t += draw(st.integers(1, 3)) * DAY
        steps.append((t, "customer.subscription.updated", {"status": "active", "product": plan, "pause": True}))
        t += DAY
        inv = {"inv": "inp", "pi": "pip", "product": plan}
        steps.append((t, "invoice.finalized", inv))
        steps.append((t + draw(st.integers(0, 1)), "invoice.marked_uncollectible", inv))
        t += draw(st.sampled_from([1, DAY]))
        steps.append((t, "customer.subscription.updated", {"status": "active", "product": plan, "pause": False}))
    # The renewal, failing.
    t += draw(st.integers(1, 5)) * DAY
    finalized = t
    inv = {"inv": "in0", "pi": "pi0", "product": plan, "fin": finalized}
    steps.append((t, "invoice.finalized", inv))
    status = "active"
    downgraded = False
    for k in range(draw(st.integers(1, 3))):
        if k:
            t += draw(st.sampled_from([1, DAY, 3 * DAY]))
        decline = draw(st.sampled_from(DECLINES))
        charge = f"ch0_{k}"
        steps.append((t, "invoice.payment_failed", {**inv, "attempt_count": k + 1}))
        steps.append((t + draw(st.integers(0, 1)), "charge.failed",
                      {**inv, "charge": charge, "pm": "pm0", "decline": decline}))
        steps.append((t + draw(st.integers(0, 2)), "payment_intent.payment_failed",
                      {**inv, "charge": charge, "pm": "pm0", "decline": decline}))
        if k == 0 and draw(st.booleans()):
            status = "past_due"
            steps.append((t, "customer.subscription.updated", {"status": status, "product": plan}))
        move = draw(st.sampled_from(["none", "none", "pause", "pause_resume", "downgrade"]))
        if move.startswith("pause") and status != "paused":
            # Stripe pauses the subscription itself after the failure, maybe resumes it later.
            t += draw(st.sampled_from([0, 1, DAY]))
            status = "paused"
            steps.append((t, "customer.subscription.paused", {"status": status, "product": plan}))
            if move == "pause_resume":
                t += draw(st.sampled_from([0, 1, DAY]))
                status = "active"
                steps.append((t, "customer.subscription.resumed", {"status": status, "product": plan}))
        elif move == "downgrade" and not downgraded:
            # The plan downgraded while in0, which billed prod_premium, is unpaid.
            downgraded = True
            t += draw(st.sampled_from([0, 1, DAY]))
            steps.append((t, "customer.subscription.updated",
                          {"status": status, "product": "prod_core", "product_before": plan}))
            plan = "prod_core"
    ending = draw(st.sampled_from(ENDINGS))
    t += draw(st.sampled_from([0, 1, DAY, 5 * DAY]))
    if ending.startswith("uncollectible"):
        steps.append((t, "invoice.marked_uncollectible", inv))
        t += draw(st.sampled_from([0, 1, DAY]))
    if ending.endswith("paid"):
        # The payment's events, in one second or a second apart (invoice_payment.paid timed by its
        # status_transitions.paid_at, its object created when the invoice was finalized).
        paid = {**inv, "charge": "ch0_paid", "pm": "pm0", "paid_at": t}
        steps.append((t, "payment_intent.succeeded", paid))
        for kind in ("invoice.paid", "invoice.payment_succeeded", "invoice_payment.paid"):
            steps.append((t + draw(st.integers(0, 1)), kind, paid))
        if draw(st.booleans()):
            steps.append((t + draw(st.integers(0, 1)), "customer.subscription.updated",
                          {"status": "active", "product": plan}))
    return in_stripe_order(steps)


def render(n: int, step: Step, s: str, customer: str) -> dict[str, Any]:
    """test_order_independence_events.render, with the subscription's pause and resumption, its pause
    of collection, and invoice_payment.paid's own times."""
    t, kind, p = step
    if kind in ("customer.subscription.paused", "customer.subscription.resumed"):
        # The fixtures hold the subscription's updated and deleted envelopes only: the same object.
        evt = base.render(n, (t, "customer.subscription.updated", p), s, customer)
        evt["type"] = kind
        return evt
    evt = base.render(n, step, s, customer)
    if kind.startswith("customer.subscription.") and "pause" in p:
        evt["data"]["object"]["pause_collection"] = dict(PAUSED) if p["pause"] else None
        evt["data"]["previous_attributes"] = {"pause_collection": None if p["pause"] else dict(PAUSED)}
    elif kind == "invoice_payment.paid":
        evt["data"]["object"]["created"] = p["fin"]
        evt["data"]["object"]["status_transitions"]["paid_at"] = p["paid_at"]
    return evt


def deliver(client: Any, engine: Engine, runtime: Any, accounts: Accounts, history: list[Step],
            order: list[int], now: datetime, every: bool) -> dict[str, Any]:
    """test_order_independence_events.deliver through this module's render."""
    return base.deliver(client, engine, runtime, accounts, history, order, now, every, rendered=render)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(history=journeys(), data=st.data())
def test_pauses_downgrades_and_racing_payments_in_any_order_end_in_the_same_state(history, data, client, accounts,
                                                                                   runtime, engine):
    now = datetime.now(UTC).replace(microsecond=0)
    shuffled = base.redelivered_order(data, len(history))
    in_order = deliver(client, engine, runtime, accounts, history, list(range(len(history))), now, every=True)
    steps = [(t - history[0][0], kind, {k: v for k, v in p.items() if k in ("inv", "status", "product", "pause")})
             for t, kind, p in history]
    for every in (True, False):
        other = deliver(client, engine, runtime, accounts, history, shuffled, now, every=every)
        assert other == in_order, "\n".join([f"every={every}", *differences(in_order, other), str(steps),
                                              str(shuffled)])


def test_a_decline_reported_after_its_intent_succeeded_is_not_announced_again(client, accounts, runtime, engine):
    """in0 declined twice on its reused intent pi0 (ch0_0, then ch0_1 a second later) and was paid on
    pi0 the second after; ch0_1's payment_intent.payment_failed is dated a second after the success.
    In Stripe's own order that late event, newer than the success, made pi0's row failed again, its
    latest failure timed by its latest charge, the successful one: a failure marker never announced,
    and PaymentFailed was emitted a third time for two declines, to a customer who had paid (found
    by the property test above). A payment intent's success is final in Stripe: no later event about
    it turns it back into a failure, whatever the order."""
    now = datetime.now(UTC).replace(microsecond=0)
    start = int(now.timestamp()) - 60 * DAY
    t = start + DAY
    inv = {"inv": "in0", "pi": "pi0", "product": "prod_premium", "fin": t}
    failed = [{**inv, "charge": f"ch0_{k}", "pm": "pm0", "decline": "insufficient_funds"} for k in range(2)]
    paid = {**inv, "charge": "ch0_paid", "pm": "pm0", "paid_at": t + 2}
    steps: list[Step] = [
        (start, "payment_method.attached", {"pm": "pm0"}),
        (start, "customer.updated", {"pm": "pm0", "changed": True}),
        (start, "customer.subscription.updated", {"status": "active", "product": "prod_premium"}),
        (t, "invoice.finalized", inv), (t, "invoice.payment_failed", {**inv, "attempt_count": 1}),
        (t, "charge.failed", failed[0]), (t, "payment_intent.payment_failed", failed[0]),
        (t + 1, "invoice.payment_failed", {**inv, "attempt_count": 2}), (t + 1, "charge.failed", failed[1]),
        (t + 2, "payment_intent.succeeded", paid), (t + 2, "invoice_payment.paid", paid),
        (t + 3, "payment_intent.payment_failed", failed[1]),
        (t + 3, "invoice.paid", paid), (t + 3, "invoice.payment_succeeded", paid)]
    history = in_stripe_order(steps)
    # deliver's check_announced: no attempt announced more often than it was declined
    in_order = deliver(client, engine, runtime, accounts, history, list(range(len(history))), now, every=True)
    assert [(a["status"], a["charge_id"]) for a in in_order["stripe_payment_attempt"]] == [
        ("succeeded", "ch0_paid_S")]
    late_first = [0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 9, 10, 12, 13]
    for every in (True, False):
        other = deliver(client, engine, runtime, accounts, history, late_first, now, every=every)
        assert other == in_order, differences(in_order, other)


def test_invoice_payment_paid_dated_after_the_intent_s_success_keeps_the_success_s_charge_in_any_order(
        client, accounts, runtime, engine):
    """in0 declined (ch0_0) and paid in the same second on its intent pi0 (ch0_paid); invoice_payment.paid,
    which names the intent and no charge, is dated a second later. Delivered first, it was the row's
    newest event with no charge, and the decline's older events filled the succeeded row's charge and
    decline code (coalesce): the intent's own success, older too, could no longer replace them. The
    row read succeeded on the declined charge ch0_0 with insufficient_funds (found by the property
    test above). A success's charge is never a decline's, in any order."""
    now = datetime.now(UTC).replace(microsecond=0)
    start = int(now.timestamp()) - 60 * DAY
    t = start + DAY
    inv = {"inv": "in0", "pi": "pi0", "product": "prod_premium", "fin": t}
    failed = {**inv, "charge": "ch0_0", "pm": "pm0", "decline": "insufficient_funds"}
    paid = {**inv, "charge": "ch0_paid", "pm": "pm0", "paid_at": t}
    steps: list[Step] = [
        (start, "payment_method.attached", {"pm": "pm0"}),
        (start, "customer.updated", {"pm": "pm0", "changed": True}),
        (start, "customer.subscription.updated", {"status": "active", "product": "prod_premium"}),
        (t, "invoice.finalized", inv), (t, "invoice.payment_failed", {**inv, "attempt_count": 1}),
        (t, "charge.failed", failed), (t, "payment_intent.payment_failed", failed),
        (t, "payment_intent.succeeded", paid), (t, "invoice.paid", paid), (t, "invoice.payment_succeeded", paid),
        (t + 1, "invoice_payment.paid", paid)]
    history = in_stripe_order(steps)
    in_order = deliver(client, engine, runtime, accounts, history, list(range(len(history))), now, every=True)
    assert [(a["status"], a["charge_id"], a["decline_code"]) for a in in_order["stripe_payment_attempt"]] == [
        ("succeeded", "ch0_paid_S", None)]
    for every in (True, False):
        other = deliver(client, engine, runtime, accounts, history, [10, *range(10)], now, every=every)
        assert other == in_order, differences(in_order, other)
