"""Which payment method a retry may use (DESIGN section 4): a new or updated method earns one free
retry until it is tried on the invoice, and no retry is planned on a method the customer removed."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from app.domain.compute import compute
from app.domain.snapshot import Charge
from app.domain.state import Status
from tests.unit.builders import NOW, attempt, days, invoice, method, policy, retry, snapshot

POLICY = policy()
MINUTE = 1 / 1440  # in days


def rules(decision) -> list[str]:
    return [r.rule for r in decision.reasons]


# --- a new default card keeps its free retry when the old card fails after the change ---------------


def _old_card_failed_after_the_new_default():
    """Renewal declined on pm_1 two days ago (insufficient_funds); a retry on pm_1 was claimed 25
    minutes ago; 20 minutes ago the customer made a new card pm_2 the default; 10 minutes ago the
    queued retry charged pm_1 and the issuer answered lost_card."""
    first = Charge("ch_1", "pm_1", days(2))
    queued_charge = Charge("ch_2", "pm_1", days(10 * MINUTE))
    intent = attempt("pi_1", "in_1", days_ago=10 * MINUTE, decline="lost_card", pm="pm_1",
                     charges=(first, queued_charge))
    queued = retry("in_1", 1, days_ago=25 * MINUTE, state="failed", pm="pm_1")
    cards = (method("pm_1", changed_days_ago=100), method("pm_2", changed_days_ago=20 * MINUTE))
    return snapshot(invoice(failed_days_ago=2, attempt_count=2), attempts=(intent,), retries=(queued,),
                    payment_methods=cards,
                    default_payment_method_id="pm_2", default_payment_method_changed_at=days(20 * MINUTE))


def test_a_new_default_card_keeps_its_free_retry_when_a_queued_retry_charged_the_old_card():
    """A method changed after the invoice's first failure and never tried on it since earns the
    free retry, also when a failure on another card lands after the change."""
    decision = compute(_old_card_failed_after_the_new_default(), POLICY, NOW)
    assert decision.state.next_retry_at is not None, rules(decision)
    assert (decision.state.retry_payment_method_id, decision.state.retry_free) == ("pm_2", True)
    assert "retry.new_method" in rules(decision)


def test_no_bad_debt_while_a_default_card_changed_before_the_last_failure_was_never_tried():
    """Permanent means the same method will not work again: a failure on the old card does not run
    the dunning out while the new default, there before that failure, was never tried."""
    decision = compute(_old_card_failed_after_the_new_default(), POLICY, NOW + timedelta(days=20))
    assert decision.state.status != Status.BAD_DEBT, rules(decision)
    assert decision.state.retry_payment_method_id == "pm_2"


def test_the_new_default_cards_free_retry_failing_earns_no_other():
    """Once the free retry on pm_2 was charged and declined, pm_2 is tried: no second free retry,
    and a permanent decline on it ends the automatic retries."""
    base = _old_card_failed_after_the_new_default()
    free = retry("in_1", 2, days_ago=5 * MINUTE, free=True, pm="pm_2", state="failed")
    declined = attempt("pi_1", "in_1", days_ago=4 * MINUTE, decline="expired_card", pm="pm_2",
                       charges=(*base.attempts[0].charges, Charge("ch_3", "pm_2", days(4 * MINUTE))))
    snap = snapshot(*base.invoices, attempts=(declined,), retries=(*base.retries, free),
                    payment_methods=base.payment_methods, default_payment_method_id="pm_2",
                    default_payment_method_changed_at=base.default_payment_method_changed_at)
    decision = compute(snap, POLICY, NOW)
    assert decision.state.next_retry_at is None and not decision.state.retry_free
    assert "retry.new_method" not in rules(decision) and "retry.none_permanent" in rules(decision)


def test_a_free_retry_declined_transiently_earns_no_other_free_retry():
    """A free retry on a new card declined for insufficient funds: the card is tried; the schedule
    goes on, counted against the budget, on the default."""
    failed = attempt("pi_1", "in_1", days_ago=2, decline="expired_card", pm="pm_1")
    free = retry("in_1", 1, days_ago=0.4, free=True, pm="pm_2", state="failed")
    declined = attempt("pi_2", "in_1", days_ago=0.39, decline="insufficient_funds", pm="pm_2")
    snap = snapshot(invoice(failed_days_ago=2, attempt_count=2), attempts=(failed, declined), retries=(free,),
                    payment_methods=(method("pm_2", changed_days_ago=0.5),), default_payment_method_id="pm_2",
                    default_payment_method_changed_at=days(0.5))
    decision = compute(snap, POLICY, NOW)
    assert not decision.state.retry_free and "retry.scheduled" in rules(decision)
    assert decision.state.retry_payment_method_id == "pm_2"


def test_a_free_retry_charged_but_not_mirrored_yet_is_used():
    """The free retry row reached Stripe (its outcome not mirrored, the guard window past): the card
    counts as tried, no second free retry."""
    failed = attempt("pi_1", "in_1", days_ago=2, decline="expired_card", pm="pm_1")
    sent = retry("in_1", 1, days_ago=0.4, free=True, pm="pm_2", state="sent")
    snap = snapshot(invoice(failed_days_ago=2), attempts=(failed,), retries=(sent,),
                    payment_methods=(method("pm_2", changed_days_ago=0.5),))
    decision = compute(snap, POLICY, NOW)
    assert decision.state.next_retry_at is None and "retry.new_method" not in rules(decision)


def test_the_failed_card_made_default_again_is_no_new_method():
    """The free retry on pm_2 was declined; the customer makes pm_2 the default afterwards: the
    same card, already tried, earns nothing."""
    failed = attempt("pi_1", "in_1", days_ago=2, decline="expired_card", pm="pm_1")
    free = retry("in_1", 1, days_ago=1, free=True, pm="pm_2", state="failed")
    declined = attempt("pi_2", "in_1", days_ago=0.99, decline="stolen_card", pm="pm_2")
    snap = snapshot(invoice(failed_days_ago=2, attempt_count=2), attempts=(failed, declined), retries=(free,),
                    payment_methods=(method("pm_2", changed_days_ago=1.5),), default_payment_method_id="pm_2",
                    default_payment_method_changed_at=days(0.5))
    decision = compute(snap, POLICY, NOW)
    assert decision.state.next_retry_at is None and "retry.none_permanent" in rules(decision)


def test_a_method_changed_before_the_first_failure_is_not_new():
    """A card attached, or made default, before the invoice first failed was there for the
    failure: no free retry."""
    failed = attempt("pi_1", "in_1", days_ago=2, decline="expired_card", pm="pm_1")
    other = method("pm_2", changed_days_ago=5)
    attached_only = snapshot(invoice(failed_days_ago=2), attempts=(failed,), payment_methods=(other,))
    made_default = snapshot(invoice(failed_days_ago=2), attempts=(failed,), payment_methods=(other,),
                            default_payment_method_id="pm_2", default_payment_method_changed_at=days(3))
    for snap in (attached_only, made_default):
        decision = compute(snap, POLICY, NOW)
        assert decision.state.next_retry_at is None and "retry.new_method" not in rules(decision)


def test_stripes_own_retry_on_the_new_default_counts_as_its_try():
    """Stripe retried the invoice itself on the new default (a charge on the invoice's intent) and
    was declined: the card is tried, no free retry on it."""
    first = Charge("ch_1", "pm_1", days(2))
    stripes = Charge("ch_2", "pm_2", days(0.3))
    intent = attempt("pi_1", "in_1", days_ago=0.3, decline="expired_card", pm="pm_2", charges=(first, stripes))
    snap = snapshot(invoice(failed_days_ago=2, attempt_count=2), attempts=(intent,),
                    payment_methods=(method("pm_2", changed_days_ago=0.5),), default_payment_method_id="pm_2",
                    default_payment_method_changed_at=days(0.5))
    decision = compute(snap, POLICY, NOW)
    assert decision.state.next_retry_at is None and "retry.new_method" not in rules(decision)


def test_stripes_own_retry_on_the_new_default_counts_even_when_its_failure_is_on_another_attempt():
    """Stripe's retry on the new default made an attempt of its own (an older row without charges):
    it is the card's try."""
    failed = attempt("pi_1", "in_1", days_ago=2, decline="insufficient_funds", pm="pm_1")
    stripes = attempt("pi_2", "in_1", days_ago=0.3, decline="do_not_honor", pm="pm_2")
    snap = snapshot(invoice(failed_days_ago=2, attempt_count=2), attempts=(failed, stripes),
                    payment_methods=(method("pm_2", changed_days_ago=0.5),), default_payment_method_id="pm_2",
                    default_payment_method_changed_at=days(0.5))
    decision = compute(snap, POLICY, NOW)
    assert not decision.state.retry_free and "retry.new_method" not in rules(decision)


def test_the_default_is_preferred_then_the_latest_change():
    """Two new cards: the default one gets the free retry; with neither default, the latest one."""
    failed = attempt("pi_1", "in_1", days_ago=2, decline="expired_card", pm="pm_1")
    cards = (method("pm_2", changed_days_ago=0.5), method("pm_3", changed_days_ago=0.2))
    with_default = snapshot(invoice(failed_days_ago=2), attempts=(failed,), payment_methods=cards,
                            default_payment_method_id="pm_2", default_payment_method_changed_at=days(0.5))
    assert compute(with_default, POLICY, NOW).state.retry_payment_method_id == "pm_2"
    no_default = snapshot(invoice(failed_days_ago=2), attempts=(failed,), payment_methods=cards)
    assert compute(no_default, POLICY, NOW).state.retry_payment_method_id == "pm_3"


# --- no retry on a card the customer removed ----------------------------------------------------


def _lost_card_with_an_untried_card_refused_every_time(refused: bool):
    """Renewal failed 40 days ago on pm_1; the customer attached pm_2 39 days ago; Stripe's own retry
    on pm_1 38 days ago came back lost_card. Every free retry on pm_2 since, Stripe refused unsent
    (an attached method it will not take for this invoice)."""
    charges = (Charge("ch_1", "pm_1", days(40)), Charge("ch_2", "pm_1", days(38)))
    failed = attempt("pi_1", "in_1", days_ago=38, decline="lost_card", pm="pm_1", charges=charges)
    refusals = tuple(retry("in_1", 1, days_ago=39 - k / 4, free=True, pm="pm_2", state="refused")
                     for k in range(39 * 4)) if refused else ()
    return snapshot(invoice(failed_days_ago=40, attempt_count=2), attempts=(failed,), retries=refusals,
                    payment_methods=(method("pm_1", changed_days_ago=400), method("pm_2", changed_days_ago=39)))


def test_an_untried_card_stripe_refuses_to_charge_does_not_keep_the_dunning_going():
    """Its free retry is refused every REFUSED_BACKOFF, never tried: it must not keep the dunning
    from running out for ever. Without the refusals, the untried card does keep it going."""
    assert compute(_lost_card_with_an_untried_card_refused_every_time(True), POLICY, NOW).state.status \
        == Status.BAD_DEBT
    waiting = compute(_lost_card_with_an_untried_card_refused_every_time(False), POLICY, NOW)
    assert waiting.state.status != Status.BAD_DEBT and "retry.untried_method" in rules(waiting)


def _a_card_added_in_bad_debt_then_the_old_card_declined_again(episode_days_ago: float | None):
    """Declined expired_card 40 days ago (no retry: bad debt from day 21); the customer attached
    pm_2 five days ago, in bad debt; two days ago they tried the old card on the hosted page:
    declined again. (The stored state and episode as gather reads them.)"""
    first = attempt("pi_1", "in_1", days_ago=40, decline="expired_card", pm="pm_1")
    cards = (method("pm_1", changed_days_ago=400), method("pm_2", changed_days_ago=5))
    before = snapshot(invoice(failed_days_ago=40), attempts=(first,), payment_methods=cards)
    stored = compute(before, POLICY, NOW).state
    assert stored.status == Status.BAD_DEBT  # the card added is no money
    late = attempt("pi_2", "in_1", days_ago=2, decline="expired_card", pm="pm_1")
    inv = replace(before.invoices[0], attempt_count=2, last_failed_at=late.attempted_at)
    return replace(before, invoices=(inv,), attempts=(first, late), stored=stored,
                   open_episode_entered_at=days(episode_days_ago) if episode_days_ago is not None else None)


def test_a_card_added_in_bad_debt_keeps_no_dunning_going_after_a_later_decline_of_the_old_card():
    """In bad debt only money gets an account out: the card added in it became 'changed before the
    last failure' when the old card was declined again, and took the account out of bad debt (a
    free retry planned; when that failed, a second episode and a second cancellation)."""
    for episode in (19, None):  # entered on day 21; or when is unknown (an older row)
        decision = compute(_a_card_added_in_bad_debt_then_the_old_card_declined_again(episode), POLICY, NOW)
        assert decision.state.status == Status.BAD_DEBT, (episode, rules(decision))
        assert "retry.untried_method" not in rules(decision)


def test_an_untried_card_there_before_bad_debt_began_takes_a_wrongly_entered_account_out():
    """A card changed before the episode began (the account should never have entered bad debt:
    the card was the dunning's next step) keeps the dunning going, and compute corrects the state."""
    snap = _a_card_added_in_bad_debt_then_the_old_card_declined_again(19)
    snap = replace(snap, open_episode_entered_at=days(3))  # entered after pm_2 came, five days ago
    decision = compute(snap, POLICY, NOW)
    assert decision.state.status != Status.BAD_DEBT and "retry.untried_method" in rules(decision)


def test_no_automatic_retry_is_planned_on_a_detached_card():
    """A scheduled retry is planned only on a method that can pay: one the customer detached (and
    no attached default) plans none, and the customer is waited for."""
    failed = attempt("pi_1", "in_1", days_ago=2, decline="insufficient_funds", pm="pm_1")
    removed = method("pm_1", changed_days_ago=1, attached=False)
    decision = compute(snapshot(invoice(failed_days_ago=2), attempts=(failed,), payment_methods=(removed,)),
                       POLICY, NOW)
    assert decision.state.next_retry_at is None, rules(decision)
    assert "retry.none_no_method" in rules(decision)


def test_refused_retries_on_a_detached_card_never_keep_the_dunning_from_running_out():
    """Retries Stripe refused on a detached card spend no budget; the dunning must still run out
    (no method left to try) and reach bad debt."""
    failed = attempt("pi_1", "in_1", days_ago=40, decline="insufficient_funds", pm="pm_1")
    removed = method("pm_1", changed_days_ago=39, attached=False)
    refused = tuple(retry("in_1", 1, days_ago=39 - k / 4, state="refused") for k in range(39 * 4))
    snap = snapshot(invoice(failed_days_ago=40), attempts=(failed,), payment_methods=(removed,), retries=refused)
    decision = compute(snap, POLICY, NOW)
    assert decision.state.next_retry_at is None and decision.state.status == Status.BAD_DEBT


def test_a_method_the_mirror_does_not_know_stays_usable():
    """An older customer whose method events were never mirrored: its retries go on as scheduled."""
    failed = attempt("pi_1", "in_1", days_ago=2, decline="insufficient_funds", pm="pm_1")
    decision = compute(snapshot(invoice(failed_days_ago=2), attempts=(failed,)), POLICY, NOW)
    assert decision.state.retry_payment_method_id == "pm_1" and decision.state.next_retry_at is not None


def test_a_detached_card_with_an_attached_default_retries_on_the_default():
    """The failed card is gone but the customer's default is attached: the schedule goes on there."""
    failed = attempt("pi_1", "in_1", days_ago=2, decline="insufficient_funds", pm="pm_1")
    methods = (method("pm_1", changed_days_ago=1, attached=False), method("pm_2", changed_days_ago=30))
    snap = snapshot(invoice(failed_days_ago=2), attempts=(failed,), payment_methods=methods,
                    default_payment_method_id="pm_2", default_payment_method_changed_at=days(30))
    decision = compute(snap, POLICY, NOW)
    assert decision.state.retry_payment_method_id == "pm_2" and "retry.scheduled" in rules(decision)


def test_a_default_the_mirror_knows_as_detached_is_not_retried():
    """Stripe clears the default of a detached method; until the mirror hears of it, a default known
    as detached is not charged: the failed card, still attached, is."""
    failed = attempt("pi_1", "in_1", days_ago=2, decline="insufficient_funds", pm="pm_1")
    methods = (method("pm_1", changed_days_ago=30), method("pm_2", changed_days_ago=1, attached=False))
    snap = snapshot(invoice(failed_days_ago=2), attempts=(failed,), payment_methods=methods,
                    default_payment_method_id="pm_2", default_payment_method_changed_at=days(30))
    decision = compute(snap, POLICY, NOW)
    assert decision.state.retry_payment_method_id == "pm_1" and "retry.scheduled" in rules(decision)


def test_a_card_added_after_the_removal_earns_its_free_retry():
    """Waiting for the customer: the card they add then gets the immediate free retry."""
    failed = attempt("pi_1", "in_1", days_ago=2, decline="insufficient_funds", pm="pm_1")
    methods = (method("pm_1", changed_days_ago=1, attached=False), method("pm_2", changed_days_ago=0.1))
    decision = compute(snapshot(invoice(failed_days_ago=2), attempts=(failed,), payment_methods=methods), POLICY, NOW)
    assert (decision.state.retry_payment_method_id, decision.state.retry_free) == ("pm_2", True)
