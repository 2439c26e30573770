"""No automatic retry is planned on a card the mirror knows to be expired when the retry would charge
it (DESIGN section 4: an expired card is a permanent decline, the same method will not work again).

Found by review: compute's mandates said "expired" but retry_cadence planned scheduled and free
retries on such a card all the same. Stripe declines it (expired_card): a charge spent for nothing
on the invoice's 8 and the card's 15 in 30 days, and a permanent class for a failure that was
transient. A card is valid through the last day of its expiry month (UTC).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

from app.domain.compute import compute
from app.domain.mandates import mandates
from tests.unit.builders import NOW, attempt, days, invoice, method, policy, retry, snapshot

POLICY = policy()  # transient schedule: days 1, 3, 5, 7, 10, 14


def rules(decision) -> list[str]:
    return [r.rule for r in decision.reasons]


def test_no_scheduled_retry_on_a_card_that_expired_since_the_failure():
    """Declined for insufficient funds on 31 October on a card expiring 10/2026: on 2 November its
    day-1 retry is not charged on it (expired), the customer is waited for."""
    failed = attempt("pi_1", "in_1", days_ago=21, pm="pm_1")
    expired = method("pm_1", changed_days_ago=100, exp_month=10, exp_year=2026)
    decision = compute(snapshot(invoice(failed_days_ago=21), attempts=(failed,), payment_methods=(expired,),
                                default_payment_method_id="pm_1", default_payment_method_changed_at=days(100)),
                       POLICY, days(19))
    assert decision.state.next_retry_at is None, rules(decision)
    assert "retry.none_no_method" in rules(decision)


def test_an_expired_default_gives_way_to_the_failed_card_still_valid():
    failed = attempt("pi_1", "in_1", days_ago=2, pm="pm_1")
    methods = (method("pm_1", changed_days_ago=100, exp_month=12, exp_year=2027),
               method("pm_2", changed_days_ago=100, exp_month=10, exp_year=2026))
    decision = compute(snapshot(invoice(failed_days_ago=2), attempts=(failed,), payment_methods=methods,
                                default_payment_method_id="pm_2", default_payment_method_changed_at=days(100)),
                       POLICY, NOW)
    assert decision.state.retry_payment_method_id == "pm_1" and "retry.scheduled" in rules(decision)


def test_no_scheduled_retry_due_after_the_card_expires():
    """Valid in November, expired by the retry's day: first failure 21 November, four retries sent;
    the fifth is due on day 10, 1 December, and the card expires at the end of November."""
    failed = attempt("pi_1", "in_1", days_ago=0, pm="pm_1")
    sent = tuple(retry("in_1", n + 1, days_ago=-d, pm="pm_1") for n, d in enumerate((1, 3, 5, 7)))
    card = method("pm_1", changed_days_ago=100, exp_month=11, exp_year=2026)
    snap = snapshot(invoice(failed_days_ago=0), attempts=(failed,), payment_methods=(card,), retries=sent,
                    default_payment_method_id="pm_1", default_payment_method_changed_at=days(100))
    decision = compute(snap, POLICY, NOW + timedelta(days=8))
    assert decision.state.next_retry_at is None, (decision.state.next_retry_at, rules(decision))
    assert "retry.none_no_method" in rules(decision)
    # The same card still valid on its day: the retry is planned as before.
    valid = method("pm_1", changed_days_ago=100, exp_month=12, exp_year=2026)
    planned = compute(snapshot(invoice(failed_days_ago=0), attempts=(failed,), payment_methods=(valid,),
                               retries=sent, default_payment_method_id="pm_1",
                               default_payment_method_changed_at=days(100)), POLICY, NOW + timedelta(days=8))
    assert planned.state.next_retry_at == NOW + timedelta(days=10), rules(planned)


def test_an_expired_card_updated_earns_no_free_retry():
    """A payment_method.updated on an expired card (its billing address edited): no immediate
    retry on it; the failed card's schedule goes on."""
    failed = attempt("pi_1", "in_1", days_ago=2, pm="pm_1")
    methods = (method("pm_1", changed_days_ago=100, exp_month=12, exp_year=2027),
               method("pm_old", changed_days_ago=0.1, exp_month=3, exp_year=2025))
    decision = compute(snapshot(invoice(failed_days_ago=2), attempts=(failed,), payment_methods=methods,
                                default_payment_method_id="pm_1", default_payment_method_changed_at=days(100)),
                       POLICY, NOW)
    assert "retry.new_method" not in rules(decision)
    assert (decision.state.retry_payment_method_id, decision.state.retry_free) == ("pm_1", False)


def test_no_retry_deferred_by_the_cards_cap_past_its_expiry():
    """The card's 15 charges in 30 days defer the retry to 1 December, when the card (11/2026) has
    expired: not planned on it (the day it would be charged is the deferred one)."""
    others = tuple(attempt(f"pi_o{i}", f"in_o{i}", days_ago=20 - i) for i in range(14))  # 1..14 November
    failed = attempt("pi_1", "in_1", days_ago=1, pm="pm_1")
    card = method("pm_1", changed_days_ago=100, exp_month=11, exp_year=2026)
    snap = snapshot(invoice(failed_days_ago=1), attempts=(*others, failed), payment_methods=(card,),
                    default_payment_method_id="pm_1", default_payment_method_changed_at=days(100))
    decision = compute(snap, POLICY, NOW)
    assert decision.state.next_retry_at is None, (decision.state.next_retry_at, rules(decision))
    assert "retry.none_no_method" in rules(decision)
    # Valid in December, the deferred retry is planned on it as before.
    valid = method("pm_1", changed_days_ago=100, exp_month=12, exp_year=2026)
    planned = compute(replace(snap, payment_methods=(valid,)), POLICY, NOW)
    assert planned.state.next_retry_at == days(20) + timedelta(days=30), rules(planned)


def test_a_cards_month_is_read_in_utc_whatever_offset_the_times_carry():
    """30 November 22:30 UTC is 1 December at +02:00: a card valid through November is still valid."""
    failed = attempt("pi_1", "in_1", days_ago=2, pm="pm_1")
    card = method("pm_1", changed_days_ago=100, exp_month=11, exp_year=2026)
    snap = snapshot(invoice(failed_days_ago=2), attempts=(failed,), payment_methods=(card,),
                    default_payment_method_id="pm_1", default_payment_method_changed_at=days(100))
    late_november = datetime(2026, 12, 1, 0, 30, tzinfo=timezone(timedelta(hours=2)))
    decision = compute(snap, POLICY, late_november)
    assert decision.state.retry_payment_method_id == "pm_1" and "retry.scheduled" in rules(decision), rules(decision)


def test_a_mandates_expiry_is_read_in_utc_too():
    card = method("pm_1", changed_days_ago=100, exp_month=11, exp_year=2026)
    late_november = datetime(2026, 12, 1, 0, 30, tzinfo=timezone(timedelta(hours=2)))
    snap = snapshot(invoice(failed_days_ago=2), payment_methods=(card,))
    [mandate] = mandates(snap, late_november)
    assert mandate.status == "usable", mandate
    [expired] = mandates(snap, late_november + timedelta(hours=2))  # 1 December 00:30 UTC
    assert expired.status == "expired"


def test_the_failed_card_waits_for_a_capped_default_to_expire():
    """The default pm_2 (11/2026) has its 15 charges in 30 days: its retry would wait until 1 December
    12:00, past its expiry. The failed card pm_1 takes the retry, but not before pm_2 has expired: until
    then pm_2 is the customer's card, and the payment path charges no other while it is the default
    (a retry planned on pm_1 now would be skipped at every claim)."""
    others = tuple(attempt(f"pi_o{i}", f"in_o{i}", days_ago=20 - i, pm="pm_2") for i in range(15))
    failed = attempt("pi_1", "in_1", days_ago=1, pm="pm_1")
    cards = (method("pm_1", changed_days_ago=100, exp_month=12, exp_year=2030),
             method("pm_2", changed_days_ago=100, exp_month=11, exp_year=2026))
    snap = snapshot(invoice(failed_days_ago=1), attempts=(*others, failed), payment_methods=cards,
                    default_payment_method_id="pm_2", default_payment_method_changed_at=days(100))
    decision = compute(snap, POLICY, NOW)
    assert decision.state.retry_payment_method_id == "pm_1", rules(decision)
    assert decision.state.next_retry_at == datetime(2026, 12, 1, tzinfo=UTC), rules(decision)


def test_no_free_retry_deferred_by_the_cards_cap_past_its_expiry():
    """pm_2 (11/2026), the customer's card for months, made the default after the failure: a new method,
    but its 15 charges in 30 days (on other invoices) defer its free retry to 1 December 12:00, when it
    has expired. Found by review: the free retry was planned on it all the same (the expiry was checked
    at the retry's immediate time only, not at the day the cap defers it to, as a scheduled retry's is):
    the retry payment path charged it on the expired card (skipped at its claim since 4b2757f, and only
    then did compute plan the failed card).
    Now it earns no free retry: the schedule goes on, on the failed card once pm_2 has expired."""
    others = tuple(attempt(f"pi_o{i}", f"in_o{i}", days_ago=20 - i, pm="pm_2") for i in range(15))
    failed = attempt("pi_1", "in_1", days_ago=1, pm="pm_1")
    cards = (method("pm_1", changed_days_ago=100, exp_month=12, exp_year=2030),
             method("pm_2", changed_days_ago=100, exp_month=11, exp_year=2026))
    snap = snapshot(invoice(failed_days_ago=1), attempts=(*others, failed), payment_methods=cards,
                    default_payment_method_id="pm_2", default_payment_method_changed_at=days(0.1))
    decision = compute(snap, POLICY, NOW)
    assert "retry.new_method" not in rules(decision), rules(decision)
    assert (decision.state.retry_payment_method_id, decision.state.retry_free) == ("pm_1", False), rules(decision)
    assert decision.state.next_retry_at == datetime(2026, 12, 1, tzinfo=UTC), rules(decision)
    # Valid in December, its deferred free retry is planned on it as before.
    valid = replace(snap, payment_methods=(cards[0], replace(cards[1], exp_month=12)))
    planned = compute(valid, POLICY, NOW)
    assert (planned.state.retry_payment_method_id, planned.state.retry_free) == ("pm_2", True), rules(planned)
    assert planned.state.next_retry_at == days(20) + timedelta(days=30), rules(planned)
