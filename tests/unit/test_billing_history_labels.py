"""Billing-history labels (DESIGN section 4) the unit tests of test_events_and_labels.py leave out."""

from dataclasses import replace

import pytest

from app.domain.attempts import attempts_by_invoice
from app.domain.billing_history import Label, history
from app.domain.snapshot import BadDebtPayment
from tests.unit.builders import NOW, attempt, days, invoice, snapshot


@pytest.mark.parametrize(("card_refunded", "ours_refunded", "expected"), [
    (0, 5000, Label.PAID),  # our duplicate payment refunded: the customer's card paid it
    (5000, 0, Label.PAID),  # the card refunded: our bad-debt payment (customer money too) paid it
    (5000, 5000, Label.RESOLVED),  # both went back: nothing kept
])
def test_an_invoice_paid_twice_is_paid_while_one_payment_is_kept(card_refunded, ours_refunded, expected):
    """The customer paid the invoice on the hosted page while our bad-debt payment for it ran (the
    overpayment alert); one of the two is refunded. The money kept still paid the invoice in full:
    Paid, not Resolved because one payment's refund equals the amount paid."""
    paid = replace(invoice("in_b", status="paid", failed_days_ago=40), paid_at=days(1))
    card = attempt("pi_card", "in_b", days_ago=1, status="succeeded", amount=5000, amount_refunded=card_refunded)
    ours = attempt("pi_bd", None, days_ago=1, status="succeeded", amount=5000, amount_refunded=ours_refunded)
    payment = BadDebtPayment(id=1, state="succeeded", amount=5000, created_at=days(1.01), updated_at=days(1),
                             stripe_payment_intent_id="pi_bd")
    snap = snapshot(paid, attempts=(card, ours), bad_debt_payments=(payment,))
    assert "pi_bd" in [a.id for a in attempts_by_invoice(snap)["in_b"]]  # filed under it
    [row] = history(snap, NOW)
    assert row.label == expected
