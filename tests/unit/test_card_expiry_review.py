"""A card's expiry is a review moment: the decision changes then with no event.

Found by an audit: subs_mandate says `expired` only when something recomputes the account after the
card's expiry month ended (a card is valid through the last day of its exp_month, UTC), and nothing
did: no review moment at a card's expiry, and the drift sweep does not compare mandates. A current
account with no events showed `usable` for an expired card for ever; a past-due account's stored
retry plan on that card stayed as planned. Each attached card's expiry instant (the first moment it
is no longer valid) is now one of the decision's review moments, in compute's shortcut for accounts
with nothing unpaid as in the full computation.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from app.domain.compute import _compute_full, compute
from app.domain.snapshot import Snapshot, Subscription
from tests.unit.builders import NOW, attempt, invoice, method, policy, snapshot

POLICY = policy()
SUBS = (Subscription("sub_1", "active", ("prod_core",)),)
END_OF_NOVEMBER = datetime(2026, 12, 1, tzinfo=UTC)  # NOW is 2026-11-21: a card of 11/2026 expires then


def current(*methods, **kw) -> Snapshot:
    return Snapshot(account_id="acct_1", stored=None, payment_methods=methods, subscriptions=SUBS,
                    default_payment_method_id=methods[0].id if methods else None, **kw)


def statuses(snap: Snapshot, at: datetime) -> dict[str, str]:
    return {m.payment_method_id: m.status for m in compute(snap, POLICY, at).mandates}


def test_a_current_accounts_card_expiring_this_month_is_reviewed_when_it_expires():
    """A current account with nothing unpaid (compute's shortcut): its card's expiry is its next review,
    and the review then says expired."""
    snap = current(method("pm_1", exp_month=11, exp_year=2026))
    decision = compute(snap, POLICY, NOW)
    assert decision.state.next_review_at == END_OF_NOVEMBER
    assert decision == _compute_full(snap, POLICY, NOW)
    assert statuses(snap, END_OF_NOVEMBER - timedelta(microseconds=1)) == {"pm_1": "usable"}
    reviewed = compute(replace(snap, stored=decision.state), POLICY, END_OF_NOVEMBER)
    assert [m.status for m in reviewed.mandates] == ["expired"]
    assert reviewed.state.next_review_at is None  # nothing else will change with time alone
    # Stored as decided, the state differs only in its review moment: the recompute writes it.
    assert reviewed.state.changed_fields(decision.state) == ["next_review_at"]


def test_the_earliest_expiry_of_the_attached_cards_is_the_review():
    """One review: the earliest of the attached cards' expiries still to come. A detached card (its
    mandate says detached whatever its expiry), a card already expired and one whose expiry the
    mirror does not know are no review moments. A card of December expires on 1 January."""
    snap = current(method("pm_1", exp_month=12, exp_year=2026), method("pm_2", exp_month=3, exp_year=2027),
                   method("pm_gone", exp_month=11, exp_year=2026, attached=False),
                   method("pm_old", exp_month=10, exp_year=2026), method("pm_bank"))
    decision = compute(snap, POLICY, NOW)
    assert decision.state.next_review_at == datetime(2027, 1, 1, tzinfo=UTC)
    assert decision == _compute_full(snap, POLICY, NOW)
    after = compute(replace(snap, stored=decision.state), POLICY, datetime(2027, 1, 1, tzinfo=UTC))
    assert after.state.next_review_at == datetime(2027, 4, 1, tzinfo=UTC)
    assert {m.payment_method_id: m.status for m in after.mandates}["pm_1"] == "expired"


def test_a_settled_invoice_does_not_hide_the_cards_expiry():
    """The shortcut with invoices (all settled) and a stored state: the same review moment."""
    snap = current(method("pm_1", exp_month=11, exp_year=2026),
                   invoices=(invoice("in_1", status="paid", failed_days_ago=None),))
    decision = compute(snap, POLICY, NOW)
    assert decision.state.next_review_at == END_OF_NOVEMBER
    assert decision == _compute_full(snap, POLICY, NOW)
    again = compute(replace(snap, stored=decision.state), POLICY, NOW)
    assert again.state.changed_fields(decision.state) == []


def test_a_past_due_accounts_card_expiry_comes_before_its_next_level_threshold():
    """In dunning, the card's expiry is a review moment beside the level thresholds: the retry planned
    on the card (due, not sent: no Stripe key, say) can no longer charge it once it has expired, so
    the plan changes then (no method left: the dunning runs out), not at the next threshold."""
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    failed = now - timedelta(days=12)  # thresholds at days 14 and 21: 2 and 9 December
    base = snapshot(replace(invoice("in_1"), created=failed - timedelta(hours=1), first_failed_at=failed,
                            last_failed_at=failed),
                    attempts=(replace(attempt("pi_1", "in_1", days_ago=0, pm="pm_1"), attempted_at=failed),),
                    payment_methods=(method("pm_1", changed_days_ago=60, exp_month=11, exp_year=2026),),
                    default_payment_method_id="pm_1")
    decision = compute(base, POLICY, now)
    assert decision.state.retry_payment_method_id == "pm_1" and decision.state.next_retry_at is not None
    assert decision.state.next_review_at == END_OF_NOVEMBER
    reviewed = compute(replace(base, stored=decision.state), POLICY, END_OF_NOVEMBER)
    assert reviewed.state.next_retry_at is None
    assert "retry.none_no_method" in [r.rule for r in reviewed.reasons]
    assert [m.status for m in reviewed.mandates] == ["expired"]
    assert reviewed.state.next_review_at == failed + timedelta(days=14)


def test_time_alone_changes_no_mandate_before_the_review():
    """Scanned hour by hour over four months: between two reviews no mandate changes."""
    snap = current(method("pm_1", exp_month=11, exp_year=2026), method("pm_2", exp_month=1, exp_year=2027),
                   method("pm_3", exp_month=2, exp_year=2027, attached=False))
    now, end, reviews = NOW, NOW + timedelta(days=120), 0
    while now < end:
        first = compute(snap, POLICY, now)
        limit = min(first.state.next_review_at or end, end)
        t = now + timedelta(hours=1)
        while t < limit:
            assert compute(replace(snap, stored=first.state), POLICY, t).mandates == first.mandates, (now, t)
            t += timedelta(hours=1)
        if first.state.next_review_at is None:
            break
        reviews += 1
        now = first.state.next_review_at
    assert reviews == 2
    assert statuses(snap, now) == {"pm_1": "expired", "pm_2": "expired", "pm_3": "detached"}
