"""Rules of the pure compute core found broken by review (each test fails without its fix).

Each test's docstring names the rule (README "Where DESIGN's table leaves a choice", DESIGN
sections 4-6) it pins. Every history here is also computed twice: the second run must change
nothing and emit nothing, and its next_review_at must come no later than the next change that time
alone makes.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from app.domain.compute import Decision, compute
from app.domain.events import BadDebtEntered, derive_events
from app.domain.snapshot import Charge, Snapshot, Subscription
from app.domain.state import Status
from tests.unit.builders import NOW, attempt, days, invoice, method, policy, retry, snapshot

POLICY = policy()
THREE_SUBSCRIPTIONS = (Subscription("sub_1", "active", ("prod_core",)),
                       Subscription("sub_2", "active", ("prod_other",)),
                       Subscription("sub_3", "active", ("prod_x",)))


def rules(decision: Decision) -> list[str]:
    return [r.rule for r in decision.reasons]


def events(stored: Snapshot, decision: Decision, now: datetime = NOW, entered: datetime | None = None) -> list[str]:
    return [e.name for e in derive_events(stored.stored, decision, now, entered)]


def stored_as_computed(snap: Snapshot, now: datetime = NOW) -> Snapshot:
    decision = compute(snap, POLICY, now)
    return replace(snap, stored=decision.state, stored_bad_debt_flag=decision.bad_debt)


def assert_stable(snap: Snapshot, now: datetime = NOW) -> Decision:
    """Computing again over the state just decided changes nothing and emits nothing (DESIGN 1)."""
    first = compute(snap, POLICY, now)
    second = compute(replace(snap, stored=first.state), POLICY, now)
    assert second.state.changed_fields(first.state) == []
    assert derive_events(first.state, second, now, snap.open_episode_entered_at) == []
    return first


FIELDS = ("status", "level", "entitlements", "actions_requested", "next_retry_at", "retry_invoice_id",
          "failure_class", "outstanding_amount", "unpaid_since")


def assert_reviews_cover_time(snap: Snapshot, now: datetime = NOW, horizon: timedelta = timedelta(days=30),
                              step: timedelta = timedelta(minutes=10)) -> None:
    """Time alone changes nothing before next_review_at (or the next retry, which beat dispatches):
    beat recomputes the account at that moment, and no event may come before it. Scanned every
    ``step``, from one review moment to the next, up to ``horizon``."""
    end = now + horizon
    while now < end:
        first = compute(snap, POLICY, now)
        # A retry already due is beat's to dispatch now; the scan looks at what comes later.
        moments = [t for t in (first.state.next_review_at, first.state.next_retry_at) if t is not None and t > now]
        limit = min([*moments, end])
        t = now + step
        while t < limit:
            later = compute(replace(snap, stored=first.state), POLICY, t)
            changed = [f for f in FIELDS if getattr(later.state, f) != getattr(first.state, f)]
            assert not changed, (now, t, first.state.next_review_at, changed)
            t += step
        if not moments:
            return
        now = min(moments) + timedelta(seconds=1)


# --- 1. in bad debt only money gets an account out ----------------------------------------------


def _expired_card_in_bad_debt(entered: datetime | None = None) -> Snapshot:
    """in_1 declined on an expired card 30 days ago: bad debt (stored), its episode begun at ``entered``."""
    base = snapshot(invoice(failed_days_ago=30),
                    attempts=(attempt("pi_1", "in_1", days_ago=30, decline="expired_card", pm="pm_1"),))
    in_bad_debt = replace(stored_as_computed(base, days(9)), open_episode_entered_at=entered)
    assert in_bad_debt.stored is not None and in_bad_debt.stored.status == Status.BAD_DEBT
    assert in_bad_debt.stored.actions_requested == ("cancel:sub_1",)
    return in_bad_debt


def _declined_again(in_bad_debt: Snapshot, *attempts_after, attempt_count: int = 2) -> Snapshot:
    inv = in_bad_debt.invoices[0]
    return replace(in_bad_debt, payment_methods=(method("pm_2", changed_days_ago=0.02),),
                   attempts=(*in_bad_debt.attempts, *attempts_after),
                   invoices=(replace(inv, attempt_count=attempt_count, last_failed_at=days(0.01)),))


def test_a_declined_hosted_page_attempt_in_bad_debt_does_not_lift_bad_debt():
    """README: 'In bad debt only money gets an account out.' The customer tries a new card on the
    hosted invoice page (or Stripe's Smart Retries run) and it is declined for insufficient funds:
    the invoice's latest failure is transient now, 1 of 6 retries used, but no money arrived. Its
    dunning stays run out: still bad debt, its cancellation kept, no retry, no BadDebtExited."""
    in_bad_debt = _expired_card_in_bad_debt()
    declined = attempt("pi_2", "in_1", days_ago=0.01, decline="insufficient_funds", pm="pm_2")
    after = _declined_again(in_bad_debt, declined)
    decision = compute(after, POLICY, NOW)
    assert decision.state.status == Status.BAD_DEBT and decision.bad_debt
    assert decision.state.level == "suspended" and decision.state.actions_requested == ("cancel:sub_1",)
    assert decision.state.next_retry_at is None and "retry.ran_out_bad_debt" in rules(decision)
    assert decision.state.failure_class == "transient"  # the latest failure's class, still reported
    assert events(after, decision) == ["PaymentFailed"]
    assert_stable(after)
    assert_reviews_cover_time(replace(after, stored=decision.state))


def test_the_old_card_declined_for_want_of_funds_in_bad_debt_beside_a_card_added_in_it_lifts_nothing():
    """The same rule when the customer added a card in bad debt (never tried: no free retry in bad
    debt) and then tried the old card again, declined for insufficient funds: neither the card nor
    the transient decline reopens the dunning."""
    in_bad_debt = _expired_card_in_bad_debt(entered=days(9))
    declined = attempt("pi_2", "in_1", days_ago=0.01, decline="insufficient_funds", pm="pm_1")
    after = _declined_again(in_bad_debt, declined)
    decision = compute(after, POLICY, NOW)
    assert decision.state.status == Status.BAD_DEBT, rules(decision)
    assert decision.state.next_retry_at is None and "retry.none_bad_debt" in rules(decision)
    assert "retry.untried_method" not in rules(decision)
    assert events(after, decision, entered=days(9)) == ["PaymentFailed"]
    assert_stable(after)


def test_a_retry_on_the_same_intent_declined_in_bad_debt_does_not_lift_it_either():
    """The same rule where Stripe confirms the invoice's payment intent again: the mirror keeps only
    its latest decline (insufficient_funds over expired_card), so the earlier run-out cannot be read
    back from the attempts. The open episode (entered 9 days ago) and the stored state keep it."""
    in_bad_debt = _expired_card_in_bad_debt(entered=days(9))
    again = replace(in_bad_debt.attempts[0], decline_code="insufficient_funds", attempted_at=days(0.01),
                    charges=(Charge("ch_1", "pm_1", days(30)), Charge("ch_2", "pm_2", days(0.01))))
    after = _declined_again(replace(in_bad_debt, attempts=()), again)
    decision = compute(after, POLICY, NOW)
    assert decision.state.status == Status.BAD_DEBT, rules(decision)
    assert events(after, decision, entered=days(9)) == ["PaymentFailed"]
    assert_stable(after)
    assert_reviews_cover_time(replace(after, stored=decision.state))  # nor does time lift it


def test_money_still_takes_the_account_out_of_bad_debt_after_a_decline_in_it():
    """The other half of the rule: the invoice paid (the next try succeeded) ends the bad debt."""
    in_bad_debt = _expired_card_in_bad_debt(entered=days(9))
    declined = attempt("pi_2", "in_1", days_ago=0.01, decline="insufficient_funds", pm="pm_2")
    still = stored_as_computed(_declined_again(in_bad_debt, declined))
    assert still.stored is not None and still.stored.status == Status.BAD_DEBT
    paid_invoice = replace(still.invoices[0], status="paid", amount_paid=5000, amount_remaining=0, paid_at=days(0))
    paid = replace(still, invoices=(paid_invoice,),
                   attempts=(*still.attempts, attempt("pi_3", "in_1", days_ago=0, status="succeeded", pm="pm_2")))
    decision = compute(paid, POLICY, NOW)
    assert decision.state.status == Status.CURRENT and decision.resolution == "paid"
    assert "BadDebtExited" in events(paid, decision, entered=days(9))


def test_a_failure_before_the_episode_began_still_decides_as_before():
    """Only a failure in bad debt keeps the dunning run out: one from before the episode (its webhook
    late) is a fact the entry should have seen, and is read as such."""
    in_bad_debt = _expired_card_in_bad_debt(entered=days(0.005))
    declined = attempt("pi_2", "in_1", days_ago=0.01, decline="insufficient_funds", pm="pm_2")
    decision = compute(_declined_again(in_bad_debt, declined), POLICY, NOW)
    assert decision.state.status == Status.PAST_DUE and "retry.ran_out_bad_debt" not in rules(decision)


def test_a_young_invoice_failing_in_another_invoices_bad_debt_keeps_its_schedule():
    """The run-out that sticks is the bad-debt rule's: an invoice 3 days unpaid whose scheduled retry
    fails while another invoice keeps the account in bad debt is retried on its schedule."""
    subs = THREE_SUBSCRIPTIONS[:2]
    a = invoice("in_a", failed_days_ago=30)
    b = invoice("in_b", failed_days_ago=3, sub="sub_2", product="prod_other", attempt_count=2)
    base = snapshot(a, b, attempts=(attempt("pi_a", "in_a", days_ago=30, decline="expired_card"),),
                    subscriptions=subs)
    in_bad_debt = replace(stored_as_computed(base, days(5)), open_episode_entered_at=days(5))
    after = replace(in_bad_debt, attempts=(*in_bad_debt.attempts, attempt("pi_b", "in_b", days_ago=0.5)),
                    retries=(retry("in_b", 1, days_ago=0.5),))
    decision = compute(after, POLICY, NOW)
    assert decision.state.status == Status.BAD_DEBT and decision.state.actions_requested == ("cancel:sub_1",)
    assert decision.state.retry_invoice_id == "in_b" and decision.state.next_retry_at is not None
    assert_stable(after)
    assert_reviews_cover_time(after, horizon=timedelta(days=3))


# --- 2. the payment-flow guard and a retry in flight ----------------------------------------------


def test_guard_holds_bad_debt_over_a_retry_in_flight_when_another_invoice_fails_meanwhile():
    """DESIGN 6 / README: recompute never newly puts an account in bad debt over a payment in flight
    (our retry sent less than the guard window ago). in_a's retry was sent 5 minutes ago, its outcome
    not back; in_b, marked uncollectible, makes bad debt; Stripe's own attempt on another invoice,
    in_c, failed 2 minutes ago. That failure is no outcome of in_a's retry: the guard still holds
    (no cancellation), until the window ends, a review moment."""
    a = invoice("in_a", failed_days_ago=3)
    b = invoice("in_b", status="uncollectible", failed_days_ago=10, sub="sub_2", product="prod_other")
    c = invoice("in_c", failed_days_ago=2 / 1440, sub="sub_3", product="prod_x")
    sent = retry("in_a", 1, days_ago=5 / 1440, state="sent")
    attempts = (attempt("pi_a", "in_a", days_ago=3), attempt("pi_c", "in_c", days_ago=2 / 1440))
    alone = compute(snapshot(a, b, attempts=attempts[:1], retries=(sent,), subscriptions=THREE_SUBSCRIPTIONS),
                    POLICY, NOW)
    assert alone.state.status == Status.PAST_DUE  # the guard holds without in_c's failure
    snap = snapshot(a, b, c, attempts=attempts, retries=(sent,), subscriptions=THREE_SUBSCRIPTIONS)
    decision = assert_stable(snap)
    assert "retry.in_flight" in rules(decision)  # in_a's own plan sees it in flight
    assert "guard.payment_in_flight" in rules(decision)
    assert decision.state.status == Status.PAST_DUE and decision.state.actions_requested == ()
    window_ends = sent.created_at + timedelta(minutes=POLICY.guard_window_minutes)
    assert decision.state.next_review_at == window_ends
    assert compute(snap, POLICY, window_ends).state.status == Status.BAD_DEBT
    assert_reviews_cover_time(snap, horizon=timedelta(days=2))


def test_the_retrys_own_outcome_still_ends_the_guards_hold():
    """The retry's own invoice's attempt failing after it was sent is its outcome: no hold then."""
    a = invoice("in_a", failed_days_ago=3, attempt_count=2)
    b = invoice("in_b", status="uncollectible", failed_days_ago=10, sub="sub_2", product="prod_other")
    sent = retry("in_a", 1, days_ago=5 / 1440, state="sent")
    outcome = attempt("pi_a", "in_a", days_ago=2 / 1440)
    decision = compute(snapshot(a, b, attempts=(outcome,), retries=(sent,), subscriptions=THREE_SUBSCRIPTIONS),
                       POLICY, NOW)
    assert decision.state.status == Status.BAD_DEBT and "guard.payment_in_flight" not in rules(decision)


# --- 3. a held upgrade revert is reviewed when its hold ends ----------------------------------------


def _upgrade_paid_awaiting_invoice_paid() -> Snapshot:
    """Upgrade in_up uncollectible 25 days; a charge on it succeeded 2 minutes ago, and Stripe's
    invoice.paid has not arrived (the mirror still says uncollectible)."""
    upgrade = invoice("in_up", status="uncollectible", failed_days_ago=25, billing_reason="subscription_update",
                      product="prod_premium")
    return snapshot(upgrade, attempts=(attempt("pi_ok", "in_up", days_ago=2 / 1440, status="succeeded", pm="pm_2"),))


def test_a_revert_held_by_a_success_awaiting_invoice_paid_is_reviewed_when_the_guard_ends():
    """README: compute stores next_review_at, when time alone would change its decision, and beat
    recomputes the account then (no event may come). The guard holds an upgrade's revert over a
    charge that succeeded while the invoice still says unpaid; if invoice.paid never comes the hold
    ends with the guard window (success + 30 min) and the revert is due: that is a review moment."""
    snap = _upgrade_paid_awaiting_invoice_paid()
    held = assert_stable(snap)
    assert "guard.revert_held" in rules(held) and held.state.actions_requested == ()
    ends = NOW - timedelta(minutes=2) + timedelta(minutes=POLICY.guard_window_minutes)
    assert held.state.next_review_at == ends
    assert compute(snap, POLICY, ends - timedelta(seconds=1)).state.actions_requested == ()
    due = compute(replace(snap, stored=held.state), POLICY, ends)
    assert due.state.actions_requested == ("revert:in_up",)
    assert [e.name for e in derive_events(held.state, due, ends)] == ["UpgradeRevertRequested"]
    assert_reviews_cover_time(snap, horizon=timedelta(days=2))


# --- 4. BadDebtEntered names the failure that made the bad debt -----------------------------------


def test_bad_debt_entered_carries_the_class_of_the_failure_that_made_it():
    """DESIGN 5: BadDebtEntered{reason, failure_class, products}, which the bad-debt report counts by
    failure class. in_a (sub_1): expired card 30 days ago, bad debt. in_b (sub_2) failed yesterday
    for insufficient funds, at notice only: the account's latest failure is transient, but the
    entry is a permanent one, of in_a's products."""
    a = invoice("in_a", failed_days_ago=30)
    b = invoice("in_b", failed_days_ago=1, sub="sub_2", product="prod_other")
    snap = snapshot(a, b, attempts=(attempt("pi_a", "in_a", days_ago=30, decline="expired_card"),
                                    attempt("pi_b", "in_b", days_ago=1, decline="insufficient_funds")),
                    subscriptions=THREE_SUBSCRIPTIONS[:2])
    decision = assert_stable(snap)
    assert decision.state.status == Status.BAD_DEBT and decision.state.failure_class == "transient"
    [entered] = [e for e in derive_events(None, decision, NOW) if e.name == "BadDebtEntered"]
    assert entered.payload() == {"reason": "retries_exhausted", "failure_class": "permanent",
                                 "products": ["prod_core"]}
    assert_reviews_cover_time(snap, horizon=timedelta(days=14))


def test_bad_debt_entered_by_the_latest_failing_of_several_suspended_invoices():
    """With several invoices in the bad debt, the one that failed last names the class; an invoice
    marked uncollectible with no failure mirrored names none of its own, and one failing since, not
    in the bad debt (in_d, yesterday), none at all."""
    a = invoice("in_a", failed_days_ago=40)
    b = invoice("in_b", failed_days_ago=30, sub="sub_2", product="prod_other")
    c = invoice("in_c", status="uncollectible", failed_days_ago=None, sub="sub_3", product="prod_x",
                marked_uncollectible_at=days(1))
    d = invoice("in_d", failed_days_ago=1, sub="sub_3", product="prod_x")
    snap = snapshot(a, b, c, d, attempts=(attempt("pi_a", "in_a", days_ago=40, decline="expired_card"),
                                          attempt("pi_b", "in_b", days_ago=30, decline="incorrect_cvc"),
                                          attempt("pi_d", "in_d", days_ago=1, decline="insufficient_funds")),
                    subscriptions=THREE_SUBSCRIPTIONS)
    decision = compute(snap, POLICY, NOW)
    [entered] = [e for e in derive_events(None, decision, NOW) if e.name == "BadDebtEntered"]
    assert isinstance(entered, BadDebtEntered)
    assert (entered.reason, entered.failure_class) == ("marked_uncollectible", "action_required")
