"""A card is a card whatever the payment method object that holds it (DESIGN 4: "Hard cap per payment
method: at most 15 attempts in 30 days (card network rules)"; a new or updated payment method earns one
immediate retry).

Card networks count retries per card number, and Stripe gives the same card attached again a new
payment method id with the same ``card.fingerprint``. Counted per id, a customer who removed the
declined card and added it again (a common "fix" on a billing page) reset the card's 15 charges in
30 days and earned a free retry on it: a card declined lost, stolen or do_not_try_again was charged
again at once, which the networks fine.
"""

from __future__ import annotations

from datetime import timedelta

from app.domain.compute import compute
from app.domain.snapshot import Charge
from tests.unit.builders import NOW, attempt, days, invoice, method, policy, snapshot

POLICY = policy()
def readded(decline: str, *, fingerprint: str = "fp_A", exp_year: int = 2030):
    """in_1 declined on pm_1 two days ago; the customer then added pm_2 as the default: the same card
    (``fingerprint`` fp_A) or another one."""
    pm_1 = method("pm_1", changed_days_ago=100, attached=False, fingerprint="fp_A", exp_month=12, exp_year=2030)
    pm_2 = method("pm_2", changed_days_ago=0.01, fingerprint=fingerprint, exp_month=12, exp_year=exp_year)
    return snapshot(invoice(failed_days_ago=2), attempts=(attempt("pi_1", "in_1", days_ago=2, decline=decline),),
                    payment_methods=(pm_1, pm_2), default_payment_method_id="pm_2",
                    default_payment_method_changed_at=days(0.01))


def rules(decision) -> list[str]:
    return [r.rule for r in decision.reasons]


def test_the_same_card_added_again_after_a_permanent_decline_earns_no_free_retry():
    decision = compute(readded("stolen_card"), POLICY, NOW)
    assert decision.state.next_retry_at is None and not decision.state.retry_free
    assert "retry.none_permanent" in rules(decision) and "retry.new_method" not in rules(decision)


def test_another_card_or_the_same_card_with_its_new_expiry_earns_it():
    other = compute(readded("stolen_card", fingerprint="fp_B"), POLICY, NOW)
    assert other.state.retry_free and other.state.retry_payment_method_id == "pm_2"
    renewed = compute(readded("expired_card", exp_year=2031), POLICY, NOW)  # the reissued card: new expiry
    assert renewed.state.retry_free and renewed.state.retry_payment_method_id == "pm_2"


def test_the_30_day_cap_counts_the_cards_charges_under_every_payment_method_id():
    """15 charges on pm_1 in the last 30 days (other invoices, paid), then the same card added again as
    pm_2: in_1's transient retry on pm_2 waits until the oldest of the card's charges is 30 days old."""
    snap = readded("insufficient_funds")
    paid = [invoice(f"in_p{i}", status="paid", failed_days_ago=None) for i in range(14)]
    charges = tuple(attempt(f"pi_p{i}", f"in_p{i}", days_ago=29 - i, status="succeeded",
                            charges=(Charge(f"ch_p{i}", "pm_1", days(29 - i)),)) for i in range(14))
    snap = snapshot(*snap.invoices, *paid, attempts=(*snap.attempts, *charges),
                    payment_methods=snap.payment_methods, default_payment_method_id="pm_2",
                    default_payment_method_changed_at=days(0.01))
    decision = compute(snap, POLICY, NOW)
    assert decision.state.retry_payment_method_id == "pm_2" and not decision.state.retry_free
    assert decision.state.next_retry_at == days(29) + timedelta(days=30)
    assert "retry.cap_method_30d" in rules(decision)
