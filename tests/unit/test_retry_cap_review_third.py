"""The card's 15-in-30-days cap counts a retry Stripe declined before the mirror heard of its charge.

Found by review (third): the cap counted our retries whose charge the mirror does not hold yet only
while they were dispatched, charging or sent. A retry Stripe answered with a card decline is marked
``failed`` at once (app/payments/pay.py), and the recompute that follows runs before the
charge.failed webhook comes (or, for an endpoint subscribed to invoice events only, before the
attempt detail is asked for, 10 minutes on): that charge was not counted, and the account's next
retry on the same card, another invoice's, was planned over the cap.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from app.domain.compute import compute
from app.domain.snapshot import Charge
from tests.unit.builders import NOW, attempt, days, invoice, method, policy, retry, snapshot

POLICY = policy()


def rules(decision) -> list[str]:
    return [r.rule for r in decision.reasons]


def test_a_declined_retry_not_mirrored_yet_counts_for_the_cards_cap():
    # pm_1: 12 charges on other invoices, then in_a and in_b failed on it: 14 in 30 days, all mirrored.
    others = tuple(attempt(f"pi_o{i}", f"in_o{i}", days_ago=20 - i) for i in range(12))
    first_a = attempt("pi_a", "in_a", days_ago=3)
    first_b = attempt("pi_b", "in_b", days_ago=1)
    # in_a's retry went to Stripe a minute ago and was declined (the 15th charge); its charge.failed
    # has not come yet.
    declined = retry("in_a", 1, days_ago=1 / 1440, state="failed", pm="pm_1")
    snap = snapshot(invoice("in_a", failed_days_ago=3), invoice("in_b", failed_days_ago=1, sub="sub_1"),
                    attempts=(*others, first_a, first_b), retries=(declined,))
    decision = compute(snap, POLICY, NOW)
    # in_b's day-1 retry (due now) would be the 16th charge on pm_1 in 30 days: it waits for the
    # oldest charge to leave the window.
    assert "retry.cap_method_30d" in rules(decision)
    assert decision.state.next_retry_at == days(20) + timedelta(days=30)


def test_once_mirrored_the_declined_retry_counts_once():
    # The same, its charge.failed in: the charge is on in_a's intent, and the retry is not counted again.
    others = tuple(attempt(f"pi_o{i}", f"in_o{i}", days_ago=20 - i) for i in range(11))
    declined_at = days(1 / 1440)
    charges = (Charge("ch_a1", "pm_1", days(3)), Charge("ch_a2", "pm_1", declined_at + timedelta(seconds=1)))
    first_a = replace(attempt("pi_a", "in_a", days_ago=3), charges=charges)
    first_b = attempt("pi_b", "in_b", days_ago=1)
    declined = retry("in_a", 1, days_ago=1 / 1440, state="failed", pm="pm_1")
    snap = snapshot(invoice("in_a", failed_days_ago=3), invoice("in_b", failed_days_ago=1, sub="sub_1"),
                    attempts=(*others, first_a, first_b), retries=(declined,))
    decision = compute(snap, POLICY, NOW)
    # 11 + 2 + 1 = 14 charges: in_b's retry is the 15th, allowed now.
    assert "retry.cap_method_30d" not in rules(decision)
    assert decision.state.next_retry_at is not None and decision.state.next_retry_at <= NOW


def test_a_declined_retry_not_mirrored_yet_counts_when_another_invoices_charge_on_the_card_came_after_it():
    """The card's cap counted a retry not mirrored yet only when it was later than the card's latest
    mirrored charge on any invoice: another invoice charged on the same card after it (its own Stripe
    retry, a renewal) hid it, and the card's 16th charge in 30 days was planned."""
    # pm_1: 11 charges on other invoices, in_a and in_b failed on it, then in_a's retry was declined a
    # minute ago (not mirrored yet), then in_c's first attempt on pm_1, 30 seconds ago, is mirrored: 15.
    others = tuple(attempt(f"pi_o{i}", f"in_o{i}", days_ago=20 - i) for i in range(11))
    first_a = attempt("pi_a", "in_a", days_ago=3)
    first_b = attempt("pi_b", "in_b", days_ago=1)
    first_c = attempt("pi_c", "in_c", days_ago=0.5 / 1440)
    declined = retry("in_a", 1, days_ago=1 / 1440, state="failed", pm="pm_1")
    snap = snapshot(invoice("in_a", failed_days_ago=3), invoice("in_b", failed_days_ago=1),
                    invoice("in_c", failed_days_ago=0.5 / 1440),
                    attempts=(*others, first_a, first_b, first_c), retries=(declined,))
    decision = compute(snap, POLICY, NOW)
    # in_b's day-1 retry (due now) would be the 16th: it waits for the oldest charge to leave the window.
    assert "retry.cap_method_30d" in rules(decision)
    assert decision.state.next_retry_at == days(20) + timedelta(days=30)


def test_a_declined_retry_counts_while_its_charge_is_timed_after_now_by_stripes_clock():
    """Stripe's clock a second ahead of ours: the retry's charge.failed is in, timed a second after the
    decision's now, and the window (up to now) leaves it out. The retry still counts as that charge."""
    others = tuple(attempt(f"pi_o{i}", f"in_o{i}", days_ago=20 - i) for i in range(12))
    charges = (Charge("ch_a1", "pm_1", days(3)), Charge("ch_a2", "pm_1", NOW + timedelta(seconds=1)))
    first_a = replace(attempt("pi_a", "in_a", days_ago=3), charges=charges)
    first_b = attempt("pi_b", "in_b", days_ago=1)
    declined = retry("in_a", 1, days_ago=1 / 86400, state="failed", pm="pm_1")
    snap = snapshot(invoice("in_a", failed_days_ago=3), invoice("in_b", failed_days_ago=1, sub="sub_1"),
                    attempts=(*others, first_a, first_b), retries=(declined,))
    decision = compute(snap, POLICY, NOW)
    # 12 + 2 + the retry = 15: in_b's retry would be the 16th.
    assert "retry.cap_method_30d" in rules(decision)


def test_the_invoices_cap_counts_a_declined_retry_not_mirrored_yet_beside_stripes_own_retries():
    """The invoice's 8 charges: its first attempt, 4 of Stripe's own automatic retries and 2 of ours,
    all mirrored on its intent (7), then our free retry on a new card pm_2 declined a minute ago, its
    charge not mirrored yet (8). The count took the larger of the mirrored charges and ours (+ the
    first failure), not both: 7, and a free retry on a third card pm_3 was planned, the 9th charge."""
    charges = tuple(Charge(f"ch_{k}", "pm_1", days(10 - k)) for k in range(7))
    intent = replace(attempt("pi_1", "in_1", days_ago=4, pm="pm_1"), charges=charges)
    ours = (retry("in_1", 1, days_ago=6, state="failed"), retry("in_1", 2, days_ago=4, state="failed"),
            retry("in_1", 3, days_ago=1 / 1440, state="failed", free=True, pm="pm_2"))
    cards = (method("pm_1", changed_days_ago=100), method("pm_2", changed_days_ago=2 / 1440),
             method("pm_3", changed_days_ago=0.5 / 1440))
    snap = snapshot(invoice(failed_days_ago=10, attempt_count=5), attempts=(intent,), retries=ours,
                    payment_methods=cards)
    decision = compute(snap, POLICY, NOW)
    assert decision.state.next_retry_at is None, rules(decision)
    assert "retry.cap_invoice" in rules(decision)


def _declined_in_the_same_second_as_its_claim():
    """in_a's retry claimed at 11:59:00.400 and charged in that second: Stripe times the charge
    11:59:00 (whole seconds), before the claim's own time."""
    claimed_at = NOW - timedelta(seconds=59.6)
    charged_at = NOW - timedelta(seconds=60)
    declined = replace(retry("in_a", 1, days_ago=0, state="failed", pm="pm_1"), created_at=claimed_at,
                       scheduled_for=claimed_at)
    return charged_at, declined


def test_a_retry_charged_in_the_second_of_its_claim_counts_once_for_the_cards_cap():
    # 11 charges on other invoices, in_a's and in_b's first, in_a's retry: 14. in_b's retry is the 15th.
    charged_at, declined = _declined_in_the_same_second_as_its_claim()
    others = tuple(attempt(f"pi_o{i}", f"in_o{i}", days_ago=20 - i) for i in range(11))
    first_a = replace(attempt("pi_a", "in_a", days_ago=3),
                      charges=(Charge("ch_a1", "pm_1", days(3)), Charge("ch_a2", "pm_1", charged_at)))
    first_b = attempt("pi_b", "in_b", days_ago=1)
    snap = snapshot(invoice("in_a", failed_days_ago=3), invoice("in_b", failed_days_ago=1),
                    attempts=(*others, first_a, first_b), retries=(declined,))
    decision = compute(snap, POLICY, NOW)
    assert "retry.cap_method_30d" not in rules(decision)
    assert decision.state.next_retry_at is not None and decision.state.next_retry_at <= NOW


def test_a_retry_charged_in_the_second_of_its_claim_counts_once_for_the_invoices_cap():
    # in_a: its first charge, 5 of ours, the last (a free one on pm_2) charged in its claim's second: 7.
    # pm_3, new, earns its free retry: the 8th charge, allowed.
    charged_at, declined = _declined_in_the_same_second_as_its_claim()
    declined = replace(declined, free=True, payment_method_id="pm_2")
    charges = (Charge("ch_0", "pm_1", days(10)), *(Charge(f"ch_{k}", "pm_1", days(9 - k)) for k in range(5)),
               Charge("ch_free", "pm_2", charged_at))
    intent = replace(attempt("pi_a", "in_a", days_ago=10, pm="pm_2"), charges=charges)
    ours = (*(retry("in_a", k + 1, days_ago=9 - k, state="failed") for k in range(5)), declined)
    cards = (method("pm_1", changed_days_ago=100), method("pm_2", changed_days_ago=2 / 1440),
             method("pm_3", changed_days_ago=0.5 / 1440))
    snap = snapshot(invoice("in_a", failed_days_ago=10), attempts=(intent,), retries=ours, payment_methods=cards)
    decision = compute(snap, POLICY, NOW)
    assert "retry.cap_invoice" not in rules(decision)
    assert (decision.state.retry_payment_method_id, decision.state.retry_free) == ("pm_3", True), rules(decision)
