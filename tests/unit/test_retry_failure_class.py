"""The failure class that decides an invoice's retries and level is its latest failure's, by when
that failure happened (attempts.failure_time), not by the attempt row's time, which moves with any
later event about its intent (a cancellation)."""

from __future__ import annotations

from app.domain.compute import compute
from app.domain.snapshot import Charge
from app.domain.state import FailureClass
from tests.unit.builders import NOW, attempt, days, invoice, policy, snapshot


def test_the_latest_failure_by_its_own_time_decides_the_class_not_an_older_intent_touched_later():
    # pi_1 declined (expired card) 5 days ago; its intent cancelled 1 day ago moved its row's time.
    # pi_2 declined 2 days ago for insufficient funds: the latest failure, transient.
    expired = attempt("pi_1", "in_1", days_ago=1, decline="expired_card", pm="pm_1",
                      charges=(Charge("ch_1", "pm_1", days(5)),))
    short = attempt("pi_2", "in_1", days_ago=2, decline="insufficient_funds", pm="pm_1",
                    charges=(Charge("ch_2", "pm_1", days(2)),))
    decision = compute(snapshot(invoice(failed_days_ago=5), attempts=(expired, short)), policy(), NOW)
    assert decision.last_failure_class == FailureClass.TRANSIENT.value
    assert decision.state.failure_class == FailureClass.TRANSIENT.value
    assert decision.state.level == "notice"  # transient, 5 days: not the permanent >= 3 days rule
    assert decision.state.next_retry_at is not None


def test_failures_at_the_same_moment_decide_one_class_whatever_later_events_touch():
    # pi_a (expired card) and pi_b (insufficient funds) both charged 2 days ago, in the same second.
    # A later event about pi_a (its intent cancelled a day ago) moves its row's time: that must not
    # make it the latest failure, nor make the invoice's class another than PaymentFailed's.
    inv = invoice(failed_days_ago=2)
    short = attempt("pi_b", "in_1", days_ago=2, decline="insufficient_funds",
                    charges=(Charge("ch_b", "pm_1", days(2)),))
    classes = set()
    for touched in (2, 1):
        expired = attempt("pi_a", "in_1", days_ago=touched, decline="expired_card",
                          charges=(Charge("ch_a", "pm_1", days(2)),))
        decision = compute(snapshot(inv, attempts=(expired, short)), policy(), NOW)
        assert decision.state.failure_class == decision.last_failure_class
        classes.add(decision.state.failure_class)
    assert len(classes) == 1


def test_two_invoices_failing_at_the_same_moment_give_the_account_the_class_payment_failed_says():
    # Stripe charged in_1 and in_2 in the same second: the account's class is that of the failure
    # PaymentFailed announces (last_failure_class), whichever order the invoices come in.
    for order in (1, -1):
        in_1, in_2 = invoice("in_1", failed_days_ago=2), invoice("in_2", failed_days_ago=2)
        expired = attempt("pi_a", "in_1", days_ago=2, decline="expired_card",
                          charges=(Charge("ch_a", "pm_1", days(2)),))
        short = attempt("pi_b", "in_2", days_ago=2, decline="insufficient_funds",
                        charges=(Charge("ch_b", "pm_1", days(2)),))
        decision = compute(snapshot(*(in_1, in_2)[::order], attempts=(expired, short)[::order]), policy(), NOW)
        assert decision.state.failure_class == decision.last_failure_class == FailureClass.TRANSIENT.value
