from dataclasses import replace
from datetime import timedelta

import pytest

from app.domain.billing_history import Label, label
from app.domain.compute import compute
from app.domain.events import derive_events
from app.domain.state import DunningState
from tests.unit.builders import NOW, attempt, days, invoice, policy, snapshot

POLICY = policy()


def names(events) -> list[str]:
    return [e.name for e in events]


def test_entering_dunning_emits_entered_failed_escalated_and_entitlements():
    snap = snapshot(invoice(failed_days_ago=1), attempts=(attempt("pi_1", "in_1", days_ago=1),))
    decision = compute(snap, POLICY, NOW)
    events = derive_events(None, decision, NOW)
    assert names(events) == ["DunningEntered", "PaymentFailed", "ConsequenceEscalated", "EntitlementsChanged"]
    assert events[1].payload() == {"attempt_id": "pi_1", "failure_class": "transient"}


def test_no_change_no_event():
    snap = snapshot(invoice(failed_days_ago=1), attempts=(attempt("pi_1", "in_1", days_ago=1),))
    decision = compute(snap, POLICY, NOW)
    assert derive_events(decision.state, decision, NOW) == []


def test_bad_debt_entry_and_exit_carry_reason_products_and_duration():
    snap = snapshot(invoice(status="uncollectible", failed_days_ago=3))
    entered = compute(snap, POLICY, NOW)
    before = DunningState(status="past_due", level="limited", unpaid_since=days(3))
    events = derive_events(before, entered, NOW)
    assert "BadDebtEntered" in names(events) and "CancellationRequested" in names(events)
    bad = next(e for e in events if e.name == "BadDebtEntered")
    assert bad.payload() == {"reason": "marked_uncollectible", "failure_class": "unknown", "products": ["prod_core"]}
    # the cancellation names its episode: entered now, or when the open episode began (back from lifting)
    cancel = next(e for e in events if e.name == "CancellationRequested")
    assert cancel.payload()["episode"] == NOW.isoformat()
    lifting = replace(before, status="lifting")
    again = next(e for e in derive_events(lifting, entered, NOW, bad_debt_entered_at=days(2))
                 if e.name == "CancellationRequested")
    assert again.payload()["episode"] == days(2).isoformat()

    paid = replace(invoice(status="paid", failed_days_ago=3), paid_at=NOW)
    exited = compute(replace(snapshot(paid), stored=entered.state), POLICY, NOW + timedelta(hours=5))
    events = derive_events(entered.state, exited, NOW + timedelta(hours=5), bad_debt_entered_at=NOW)
    assert names(events)[:3] == ["ConsequenceEased", "BadDebtExited", "DunningResolved"]
    assert events[1].payload() == {"how": "paid", "duration_seconds": 5 * 3600}


@pytest.mark.parametrize(
    ("inv", "attempts", "expected"),
    [
        (invoice(status="paid", failed_days_ago=None), (), Label.PAID),
        (invoice(status="void", failed_days_ago=3), (), Label.RESOLVED),
        (invoice(status="uncollectible", failed_days_ago=3), (), Label.UNCOLLECTIBLE),
        (invoice(failed_days_ago=3), (), Label.PAST_DUE),
        (invoice(failed_days_ago=None), (), Label.OPEN),
        # credited / paid out of band: closed without the customer paying in full
        (replace(invoice(status="paid", failed_days_ago=None), amount_paid=0, credited_amount=5000), (),
         Label.RESOLVED),
        (replace(invoice(status="paid", failed_days_ago=None), amount_paid=1000), (), Label.RESOLVED),
        # fully refunded: the money went back
        (invoice(status="paid", failed_days_ago=None),
         (attempt("pi_1", "in_1", days_ago=1, status="succeeded", amount=5000, amount_refunded=5000),), Label.RESOLVED),
        (invoice(status="paid", failed_days_ago=None),
         (attempt("pi_1", "in_1", days_ago=1, status="succeeded", amount=5000, amount_refunded=100),), Label.PAID),
        # paid, then credited in full by a credit note (to the customer's balance): not the customer's money
        (replace(invoice(status="paid", failed_days_ago=None), credited_amount=5000), (), Label.RESOLVED),
        (replace(invoice(status="paid", failed_days_ago=None), credited_amount=1000), (), Label.PAID),
        # a credit note that refunded: counted once, not as credit plus refund
        (replace(invoice(status="paid", failed_days_ago=None), credited_amount=2500),
         (attempt("pi_1", "in_1", days_ago=1, status="succeeded", amount=5000, amount_refunded=2500),), Label.PAID),
    ],
)
def test_billing_history_labels(inv, attempts, expected):
    assert label(inv, attempts, NOW) == expected


def test_open_invoice_past_due_date_is_labelled_past_due():
    inv = invoice(failed_days_ago=None, due_date=days(1))
    assert label(inv, (), NOW) == Label.PAST_DUE
    assert label(inv, (), days(2)) == Label.OPEN


def test_an_invoice_not_due_yet_is_open_though_an_early_payment_failed():
    inv = invoice(failed_days_ago=2, due_date=NOW + timedelta(days=5))
    assert label(inv, [attempt("pi_1", "in_1", days_ago=2)], NOW) == Label.OPEN
    assert label(inv, [attempt("pi_1", "in_1", days_ago=2)], NOW + timedelta(days=6)) == Label.PAST_DUE
