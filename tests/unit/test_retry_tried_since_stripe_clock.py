"""Whether our retry tried a card after its change, when the retry's charge is not mirrored yet: by
what the mirror held when the retry was claimed (Stripe's clock), not only by the claim's own time.

Found by a clock audit: a card updated at Stripe (payment_method.updated, a new expiry) earns one
free retry unless tried since the update, and our retries' charges not mirrored yet counted as tries
when claimed (payment_retry.created_at, beat's clock) at or after the update (Stripe's clock). With
beat 90 s behind Stripe, a scheduled retry claimed a minute after the update, the update's webhook
already in, was timed before it: once it was declined (marked failed at once, its charge's webhook
still to come) the recompute planned a free retry on the card it had just declined, charged right
away. The claim records the card's change time the mirror held (payment_retry.method_change_seen_at):
a retry claimed knowing of the update tried the card after it.
"""

from __future__ import annotations

from dataclasses import replace

from app.domain.compute import compute
from tests.unit.builders import NOW, attempt, days, invoice, method, policy, retry, snapshot

POLICY = policy()
MINUTE = 1 / 1440  # in days
UPDATED = 3 * MINUTE  # pm_1 updated at Stripe 3 minutes ago (by Stripe's clock)


def _declined_after_the_update(seen_days_ago: float | None):
    """Renewal declined on pm_1 two days ago; pm_1 updated 3 minutes ago; a scheduled retry on pm_1
    claimed 2 minutes ago by a beat host 90 s behind Stripe (3.5 minutes ago by its clock), declined,
    its charge not mirrored yet. ``seen_days_ago``: pm_1's change time the mirror held at the claim."""
    first = attempt("pi_1", "in_1", days_ago=2, pm="pm_1")
    claimed = replace(retry("in_1", 1, days_ago=3.5 * MINUTE, state="failed", pm="pm_1"),
                      method_change_seen_at=days(seen_days_ago) if seen_days_ago is not None else None)
    return snapshot(invoice(failed_days_ago=2), attempts=(first,), retries=(claimed,),
                    payment_methods=(method("pm_1", changed_days_ago=UPDATED),))


def test_a_retry_claimed_knowing_of_the_card_update_tried_the_card_whatever_beats_clock():
    decision = compute(_declined_after_the_update(seen_days_ago=UPDATED), POLICY, NOW)
    assert "retry.new_method" not in [r.rule for r in decision.reasons], decision.reasons
    assert not decision.state.retry_free


def test_a_retry_claimed_before_the_card_update_leaves_it_its_free_retry():
    """The claim knew only an older change of the card: the update came after it, and earns its retry."""
    decision = compute(_declined_after_the_update(seen_days_ago=100), POLICY, NOW)
    assert (decision.state.retry_payment_method_id, decision.state.retry_free) == ("pm_1", True), decision.reasons


def _second_new_card_declined(claimed_minutes_ago: float, seen_minutes_ago: float | None = 9):
    """Renewal declined on pm_1 two days ago; the customer added pm_a 10 minutes ago and pm_b 9 minutes
    ago, made pm_b the default, and pm_b's free retry was declined 8.5 minutes ago (its charge mirrored,
    Stripe's clock); beat claimed it ``claimed_minutes_ago`` by its own clock. ``seen_minutes_ago``:
    pm_b's change the mirror held at the claim."""
    from app.domain.snapshot import Charge

    charges = (Charge("ch_1", "pm_1", days(2)), Charge("ch_2", "pm_b", days(8.5 * MINUTE)))
    intent = attempt("pi_1", "in_1", days_ago=8.5 * MINUTE, pm="pm_b", charges=charges)
    free = replace(retry("in_1", 1, days_ago=claimed_minutes_ago * MINUTE, free=True, state="failed", pm="pm_b"),
                   method_change_seen_at=days(seen_minutes_ago * MINUTE) if seen_minutes_ago is not None else None)
    cards = (method("pm_1", changed_days_ago=100), method("pm_a", changed_days_ago=10 * MINUTE),
             method("pm_b", changed_days_ago=9 * MINUTE))
    return snapshot(invoice(failed_days_ago=2), attempts=(intent,), retries=(free,), payment_methods=cards,
                    default_payment_method_id="pm_b", default_payment_method_changed_at=days(9 * MINUTE))


def test_two_cards_added_together_earn_one_free_retry_whatever_beats_clock():
    """The free retry on pm_b was claimed after both cards were added; on a beat host 2 minutes behind
    Stripe its claim is timed 10.5 minutes ago, "before" pm_a was added: pm_a earns no second free
    retry right after pm_b's decline, as on a host whose clock agrees with Stripe's."""
    for claimed in (8.6, 10.5):  # beat's clock right, then 2 minutes behind Stripe's
        decision = compute(_second_new_card_declined(claimed), POLICY, NOW)
        assert "retry.new_method" not in [r.rule for r in decision.reasons], (claimed, decision.reasons)
        assert not decision.state.retry_free and decision.state.retry_payment_method_id == "pm_b", claimed


def test_a_card_added_after_the_free_retry_was_claimed_earns_its_own():
    """pm_a added after the claim (its change later than pm_b's that the claim knew of): its own free retry."""
    snap = _second_new_card_declined(10.5)
    snap = replace(snap, payment_methods=(*snap.payment_methods[:1], method("pm_a", changed_days_ago=MINUTE),
                                          snap.payment_methods[2]))
    decision = compute(snap, POLICY, NOW)
    assert (decision.state.retry_payment_method_id, decision.state.retry_free) == ("pm_a", True), decision.reasons
