"""The dunning clock starts at the invoice's FIRST failure (DESIGN 4: transient retries on days 1, 3, 5,
7, 10, 14 after the first failure; the levels count days unpaid), also while its invoice.payment_failed
is not mirrored (webhooks come in no set order, and late).

Stripe confirms an invoice's payment intent again for each retry: one attempt row carries every
charge, and its own time (attempted_at) moves with each later event about the intent. Read from
that time, the first failure moved to the latest retry: the retries after it were counted from
there and the levels restarted their days.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from app.domain.compute import compute
from app.domain.snapshot import Charge
from app.domain.state import Level
from tests.unit.builders import NOW, attempt, days, invoice, policy, retry, snapshot

POLICY = policy()


def failed_twice(first_days_ago: float, second_days_ago: float, event_days_ago: float):
    """An invoice whose invoice.payment_failed is not mirrored yet, and its intent: declined at its
    first attempt and again at our first retry; the intent's latest event came at ``event_days_ago``."""
    inv = replace(invoice(failed_days_ago=None), created=days(first_days_ago + 0.1))
    charges = (Charge("ch_1", "pm_1", days(first_days_ago)), Charge("ch_2", "pm_1", days(second_days_ago)))
    intent = attempt("pi_1", "in_1", days_ago=event_days_ago, charges=charges)
    return snapshot(inv, attempts=(intent,), retries=(retry("in_1", 1, days_ago=second_days_ago),))


def test_the_retry_schedule_counts_from_the_first_charge_of_the_intent_not_its_latest_event():
    decision = compute(failed_twice(6, 5, event_days_ago=4.9), POLICY, NOW)
    assert decision.state.unpaid_since == days(6)
    # retry 2 of the transient schedule: day 3 after the first failure (due, so at once), not day 3 after
    # the intent's latest event
    assert decision.state.next_retry_at == days(6) + timedelta(days=3)
    assert decision.state.retries_used == 1


def test_the_levels_count_the_days_from_the_first_failure():
    decision = compute(failed_twice(8, 7, event_days_ago=6.5), POLICY, NOW)
    assert decision.state.unpaid_since == days(8)
    assert decision.state.level == Level.RESTRICT_PREMIUM  # 8 days unpaid, not 6.5


def test_a_charge_from_before_the_invoice_never_dates_its_debt_back():
    """An older intent (a one-off charge declined months ago, linked to no invoice) filed under this
    invoice because a later event about it (its cancellation) moved its time: its old charge is no
    failure of this invoice, and must not make it months unpaid (bad debt at once)."""
    inv = replace(invoice(failed_days_ago=2), created=days(2.1))
    old = attempt("pi_old", None, days_ago=1, charges=(Charge("ch_old", "pm_1", days(120)),))
    decision = compute(snapshot(inv, attempts=(old,)), POLICY, NOW)
    assert decision.state.unpaid_since == days(2)
    assert decision.state.level == Level.NOTICE


def test_the_events_of_one_attempt_seconds_apart_keep_the_start_as_it_was():
    """The charge is made seconds before Stripe's invoice.payment_failed: the start stays the earliest
    of that event and the attempt's time, as decisions already stored say (no drift on deploy)."""
    inv = invoice(failed_days_ago=2)
    intent = attempt("pi_1", "in_1", days_ago=2 - 1 / 86400,
                     charges=(Charge("ch_1", "pm_1", days(2) - timedelta(seconds=5)),))
    assert compute(snapshot(inv, attempts=(intent,)), POLICY, NOW).state.unpaid_since == days(2)
