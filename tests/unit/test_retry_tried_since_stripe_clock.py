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
