"""An invoice Stripe marked uncollectible because its subscription's payment collection was paused
with ``behavior = mark_uncollectible`` (the merchant gives the service for free meanwhile: the
invoice is finalized and marked at once, never attempted) is no debt: no bad debt, no cancellation,
labelled Resolved. Marked outside such a pause, or attempted and failed, it is bad debt as before."""

from __future__ import annotations

from dataclasses import replace

import pytest

from app.domain.billing_history import Label, history
from app.domain.compute import compute
from app.domain.snapshot import Invoice, Subscription
from tests.unit.builders import NOW, attempt, days, invoice, policy, snapshot

POLICY = policy()


def _paused(*observed: tuple[float, str | None]) -> Subscription:
    """sub_1 (prod_core), its events' word on pause_collection (days ago, behavior)."""
    return Subscription("sub_1", "active", ("prod_core",),
                        tuple(sorted((int(days(d).timestamp()), b) for d, b in observed)))


def _marked(created_days_ago: float = 20) -> Invoice:
    inv = invoice("in_1", status="uncollectible", failed_days_ago=None)
    return replace(inv, created=days(created_days_ago), marked_uncollectible_at=days(created_days_ago))


def test_marked_by_a_mark_uncollectible_pause_is_no_debt():
    snap = snapshot(_marked(), subscriptions=(_paused((30, "mark_uncollectible")),))
    decision = compute(snap, POLICY, NOW)
    assert decision.state.status == "current" and decision.state.level == "none"
    assert decision.bad_debt is False and decision.state.actions_requested == ()
    assert decision.state.outstanding_amount == 0
    assert decision.state.entitlements["products"] == {"prod_core": "full"}
    assert [r.rule for r in decision.state.reasons] == ["invoice.collection_paused", "status.current"]
    assert [h.label for h in history(snap, NOW)] == [Label.RESOLVED]


@pytest.mark.parametrize("subscription, marked", [
    pytest.param(_paused((30, None)), _marked(), id="collection_not_paused"),
    pytest.param(_paused((30, "keep_as_draft")), _marked(), id="another_behavior"),
    pytest.param(_paused((10, "mark_uncollectible")), _marked(), id="paused_after_the_invoice_was_made"),
    pytest.param(_paused((30, "mark_uncollectible"), (25, None)), _marked(), id="resumed_before_it"),
    pytest.param(_paused(), _marked(), id="no_word_of_the_pause"),
])
def test_a_marking_outside_such_a_pause_is_bad_debt(subscription, marked):
    snap = snapshot(marked, subscriptions=(subscription,))
    decision = compute(snap, POLICY, NOW)
    assert decision.state.status == "bad_debt" and decision.bad_debt_reason == "marked_uncollectible"
    assert decision.state.actions_requested == ("cancel:sub_1",)
    assert [h.label for h in history(snap, NOW)] == [Label.UNCOLLECTIBLE]


def test_an_invoice_attempted_during_the_pause_is_bad_debt():
    """Tried and failed (Stripe counted an attempt, or a failed attempt is filed under it): a debt."""
    paused = (_paused((30, "mark_uncollectible")),)
    counted = replace(_marked(), attempt_count=1)
    assert compute(snapshot(counted, subscriptions=paused), POLICY, NOW).state.status == "bad_debt"
    failed = snapshot(_marked(), attempts=(attempt("pi_1", "in_1", days_ago=20),), subscriptions=paused)
    assert compute(failed, POLICY, NOW).state.status == "bad_debt"


def test_a_forgiven_invoice_does_not_hide_a_real_debt_beside_it():
    """Another invoice of the account marked uncollectible outside the pause is still bad debt, and
    the forgiven one is no part of what is owed."""
    real = replace(invoice("in_2", status="uncollectible", failed_days_ago=None, sub="sub_2", product="prod_other"),
                   created=days(15), marked_uncollectible_at=days(15))
    subs = (_paused((30, "mark_uncollectible")), Subscription("sub_2", "active", ("prod_other",)))
    decision = compute(snapshot(_marked(), real, subscriptions=subs), POLICY, NOW)
    assert decision.state.status == "bad_debt"
    assert decision.state.actions_requested == ("cancel:sub_2",)
    assert decision.state.outstanding_amount == real.amount_remaining
    assert decision.state.entitlements["products"]["prod_core"] == "full"
