"""'Failed again in bad debt' counts from the moment Stripe dates the bad debt from, not from when
the episode's row was written (README "In bad debt only money gets an account out").

in_0 is marked uncollectible 20 days ago (bad debt). in_1, declined on an expired card 28 days
ago (its dunning run out), fails again 17 days ago, for want of funds, on the same payment intent
(the mirror keeps its latest decline only): a failure in bad debt, which reopens nothing. Stripe
redelivers an event for days when the endpoint was down: when invoice.marked_uncollectible comes
after in_1's second failure, the episode's row is written after that failure. The decision must be
the one made had it come on time.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from app.domain.compute import Decision, compute
from app.domain.events import derive_events
from app.domain.snapshot import Charge, Snapshot, Subscription
from app.domain.state import Status
from tests.unit.builders import NOW, attempt, days, invoice, policy, snapshot

POLICY = policy()
SUBSCRIPTIONS = (Subscription("sub_1", "active", ("prod_core",)), Subscription("sub_2", "active", ("prod_other",)))
MARKED = days(20)
IN_1_FAILED_AGAIN = days(17)
FIELDS = ("status", "level", "entitlements", "actions_requested", "next_retry_at", "retry_invoice_id",
          "retries_used")


def _in_0(marked: bool) -> tuple:
    inv = invoice("in_0", failed_days_ago=30, sub="sub_2", product="prod_other")
    if marked:
        inv = replace(inv, status="uncollectible", marked_uncollectible_at=MARKED)
    return (inv,)


def _in_1(failed_again: bool) -> tuple:
    inv = invoice("in_1", failed_days_ago=28)
    first = attempt("pi_1", "in_1", days_ago=28, decline="expired_card", charges=(Charge("ch_1", "pm_1", days(28)),))
    if not failed_again:
        return inv, first
    again = replace(first, decline_code="insufficient_funds", attempted_at=IN_1_FAILED_AGAIN,
                    charges=(*first.charges, Charge("ch_2", "pm_1", IN_1_FAILED_AGAIN)))
    return replace(inv, attempt_count=2, last_failed_at=IN_1_FAILED_AGAIN), again


def _snapshot(marked: bool, failed_again: bool) -> Snapshot:
    inv_1, pi_1 = _in_1(failed_again)
    return snapshot(*_in_0(marked), inv_1, attempts=(attempt("pi_0", "in_0", days_ago=30), pi_1),
                    subscriptions=SUBSCRIPTIONS)


def _recomputed(snap: Snapshot, at: datetime, stored: Snapshot, entered: datetime | None) -> Snapshot:
    """``snap`` after a recompute at ``at`` over ``stored``'s state; the episode opened at ``entered``
    when that recompute put the account in bad debt (as apply writes it), kept when already open."""
    decision = compute(replace(snap, stored=stored.stored, open_episode_entered_at=stored.open_episode_entered_at),
                       POLICY, at)
    episode = stored.open_episode_entered_at
    if decision.state.status == Status.BAD_DEBT and episode is None:
        episode = entered
    return replace(snap, stored=decision.state, open_episode_entered_at=episode)


def _on_time() -> Decision:
    """Each event recomputed when it happened: marked 20 days ago, in_1 failed again 17 days ago."""
    first = _recomputed(_snapshot(False, False), days(25), snapshot(), None)
    marked = _recomputed(_snapshot(True, False), MARKED, first, MARKED)
    again = _recomputed(_snapshot(True, True), IN_1_FAILED_AGAIN, marked, None)
    assert again.open_episode_entered_at == MARKED
    return compute(again, POLICY, NOW)


def _assert_same(late: Decision, on_time: Decision) -> None:
    assert {f: getattr(late.state, f) for f in FIELDS} == {f: getattr(on_time.state, f) for f in FIELDS}
    assert "retry.ran_out_bad_debt" in [r.rule for r in late.reasons]


def test_on_time_the_failure_in_bad_debt_keeps_the_dunning_run_out():
    decision = _on_time()
    assert decision.state.status == Status.BAD_DEBT and decision.state.level == "suspended"
    assert decision.state.next_retry_at is None
    assert decision.state.actions_requested == ("cancel:sub_1", "cancel:sub_2")
    assert "retry.ran_out_bad_debt" in [r.rule for r in decision.reasons]


def test_a_marking_delivered_after_the_failure_decides_as_on_time():
    """invoice.marked_uncollectible delivered 16 days ago, after in_1's failure: the episode's row
    dates from then. The failure is still one in bad debt (it came after the marking, in Stripe's
    time): later recomputes decide as on time."""
    first = _recomputed(_snapshot(False, False), days(25), snapshot(), None)
    failed = _recomputed(_snapshot(False, True), IN_1_FAILED_AGAIN, first, None)
    late = _recomputed(_snapshot(True, True), days(16), failed, days(16))
    assert late.open_episode_entered_at == days(16)
    decision = compute(late, POLICY, NOW)
    _assert_same(decision, _on_time())
    again = compute(replace(late, stored=decision.state), POLICY, NOW)
    assert again.state.changed_fields(decision.state) == []
    assert derive_events(decision.state, again, NOW, late.open_episode_entered_at) == []


def test_a_marking_learned_with_the_failure_in_one_late_recompute_decides_as_on_time():
    """Both learned by one recompute, today, the account not in bad debt before it: the recompute
    that enters bad debt already reads in_1's failure as one in it, and the next changes nothing."""
    first = _recomputed(_snapshot(False, False), days(25), snapshot(), None)
    snap = replace(_snapshot(True, True), stored=first.stored)
    decision = compute(snap, POLICY, NOW)
    _assert_same(decision, _on_time())
    entered = replace(snap, stored=decision.state, open_episode_entered_at=NOW)
    again = compute(entered, POLICY, NOW)
    assert again.state.changed_fields(decision.state) == []
    assert derive_events(decision.state, again, NOW, NOW) == []


def test_a_failure_before_the_marking_still_reopens_the_schedule():
    """The other side: in_1 failed again 17 days ago, in_0 was marked uncollectible 15 days ago (its
    webhook on time or not): that failure came before the bad debt, and reopened in_1's schedule."""
    first = _recomputed(_snapshot(False, False), days(25), snapshot(), None)
    failed = _recomputed(_snapshot(False, True), IN_1_FAILED_AGAIN, first, None)
    snap = _snapshot(True, True)
    snap = replace(snap, invoices=(replace(snap.invoices[0], marked_uncollectible_at=days(15)), *snap.invoices[1:]))
    for at in (days(15), days(14)):
        marked = _recomputed(snap, at, failed, at)
        decision = compute(marked, POLICY, NOW)
        assert decision.state.status == Status.BAD_DEBT and decision.state.retry_invoice_id == "in_1"
        assert "retry.ran_out_bad_debt" not in [r.rule for r in decision.reasons]
