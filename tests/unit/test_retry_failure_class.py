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
