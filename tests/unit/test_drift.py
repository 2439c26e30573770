"""Drift between stored and desired state, and the sweep's payment-flow guard."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from app.domain.compute import compute
from app.domain.drift import BAD_DEBT_FLAG, drift, drift_of, payment_in_flight
from app.domain.snapshot import Attempt, BadDebtPayment, Invoice, InvoiceLine, Retry, Snapshot, Subscription
from app.domain.state import DunningState, Reason
from app.policy_file import load_policy

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
POLICY = load_policy()
SUB = Subscription("sub_1", "active", ("prod_core",))


def unpaid_invoice(days: float, status: str = "open") -> Invoice:
    failed = NOW - timedelta(days=days)
    return Invoice(id="in_1", status=status, billing_reason="subscription_cycle", subscription_id="sub_1",
                   amount_due=5000, amount_paid=0, amount_remaining=5000, created=failed - timedelta(hours=1),
                   lines=(InvoiceLine("prod_core", 5000),), attempt_count=1, first_failed_at=failed,
                   last_failed_at=failed)


def snap(*invoices: Invoice, stored: DunningState | None = None, flag: bool = False, **kw) -> Snapshot:
    return Snapshot(account_id="acct_1", stored=stored, stored_bad_debt_flag=flag, invoices=invoices,
                    subscriptions=(SUB,), **kw)


def settled(snapshot: Snapshot) -> Snapshot:
    """The snapshot as it is after a recompute stored its decision."""
    decision = compute(snapshot, POLICY, NOW)
    return replace(snapshot, stored=decision.state, stored_bad_debt_flag=decision.bad_debt)


def test_a_fresh_account_without_a_row_is_not_drift():
    assert drift_of(snap(), compute(snap(), POLICY, NOW)) is None
    bare = Snapshot(account_id="acct_1", stored=None)
    assert drift_of(bare, compute(bare, POLICY, NOW)) is None


def test_a_fresh_account_without_a_row_but_flagged_bad_debt_is_drift():
    s = snap(flag=True)
    found = drift_of(s, compute(s, POLICY, NOW))
    assert found is not None and BAD_DEBT_FLAG in found.fields
    assert found.stored[BAD_DEBT_FLAG] is True and found.desired[BAD_DEBT_FLAG] is False


def test_an_unpaid_account_without_a_row_is_drift():
    s = snap(unpaid_invoice(2))
    found = drift_of(s, compute(s, POLICY, NOW))
    assert found is not None
    assert {"row", "status", "level"} <= set(found.fields)
    assert found.desired["status"] == "past_due" and found.stored["status"] == "current"


def test_stored_equal_to_desired_is_not_drift_even_with_other_wording_or_policy_version():
    s = settled(snap(unpaid_invoice(8)))
    decision = compute(s, POLICY, NOW)
    assert drift_of(s, decision) is None
    assert s.stored is not None
    reworded = replace(s.stored, reasons=(Reason("x", "other words"),), policy_version="old")
    assert drift(reworded, s.stored_bad_debt_flag, decision.state, decision.bad_debt) is None



def test_a_last_failure_stored_as_a_plain_attempt_id_is_not_drift():
    """last_failure_id now names the failure with its time: rows written before hold the attempt id
    alone, and the sweep must not send every account in dunning to remediation for that."""
    from app.domain.snapshot import Attempt

    failed = Attempt("pi_1", "in_1", "pm_1", "failed", NOW - timedelta(days=8), decline_code="insufficient_funds")
    s = settled(snap(unpaid_invoice(8), attempts=(failed,)))
    assert s.stored is not None and s.stored.last_failure_id == f"pi_1@{failed.attempted_at.isoformat()}"
    plain = replace(s, stored=replace(s.stored, last_failure_id="pi_1"))
    assert drift_of(plain, compute(plain, POLICY, NOW)) is None

def test_corrupted_fields_are_named_with_stored_and_desired_values():
    s = settled(snap(unpaid_invoice(8)))
    assert s.stored is not None and s.stored.level == "restrict_premium"
    corrupt = replace(s, stored=replace(s.stored, status="bad_debt", level="suspended"), stored_bad_debt_flag=True)
    found = drift_of(corrupt, compute(corrupt, POLICY, NOW))
    assert found is not None
    assert found.fields == ("status", "level", BAD_DEBT_FLAG)
    assert found.stored == {"status": "bad_debt", "level": "suspended", BAD_DEBT_FLAG: True}
    assert found.desired == {"status": "past_due", "level": "restrict_premium", BAD_DEBT_FLAG: False}


def test_only_the_flag_drifted():
    s = settled(snap())
    found = drift_of(replace(s, stored_bad_debt_flag=True), compute(s, POLICY, NOW))
    assert found is not None and found.fields == (BAD_DEBT_FLAG,)


def test_time_values_are_json():
    s = settled(snap(unpaid_invoice(2)))
    assert s.stored is not None
    corrupt = replace(s, stored=replace(s.stored, unpaid_since=NOW))
    found = drift_of(corrupt, compute(corrupt, POLICY, NOW))
    assert found is not None and found.stored["unpaid_since"] == NOW.isoformat()


def retry(minutes_ago: float, state: str = "dispatched") -> Retry:
    at = NOW - timedelta(minutes=minutes_ago)
    return Retry(invoice_id="in_1", payment_method_id="pm_1", retry_number=1, free=False, state=state,
                 scheduled_for=at, created_at=at)


def test_guard_keeps_the_sweep_off_payments_in_flight():
    assert payment_in_flight(snap(), POLICY, NOW) is None
    lifting = replace(DunningState(), status="lifting")
    assert payment_in_flight(snap(stored=lifting), POLICY, NOW) == "lifting"
    pending = BadDebtPayment(id=1, state="pending", amount=5000, created_at=NOW, updated_at=NOW)
    assert payment_in_flight(snap(bad_debt_payments=(pending,)), POLICY, NOW) == "bad_debt_payment_pending"
    done = replace(pending, state="failed")
    assert payment_in_flight(snap(bad_debt_payments=(done,)), POLICY, NOW) is None
    for state in ("dispatched", "charging", "sent"):
        assert payment_in_flight(snap(retries=(retry(10, state),)), POLICY, NOW) == "retry_in_flight"
    assert payment_in_flight(snap(retries=(retry(29.9),)), POLICY, NOW) == "retry_in_flight"
    assert payment_in_flight(snap(retries=(retry(30),)), POLICY, NOW) is None
    assert payment_in_flight(snap(retries=(retry(31),)), POLICY, NOW) is None
    assert payment_in_flight(snap(retries=(retry(5, "failed"),)), POLICY, NOW) is None
    shorter = replace(POLICY, guard_window_minutes=5)
    assert payment_in_flight(snap(retries=(retry(10),)), shorter, NOW) is None


def test_guard_keeps_the_sweep_off_a_stripe_attempt_without_an_outcome():
    """A Stripe attempt still running (its outcome not in: pending, processing, waiting for the
    customer's authentication) holds the sweep off within the guard window, not a finished one."""
    def tried(status: str, minutes_ago: float) -> Attempt:
        return Attempt(id="pi_1", invoice_id="in_1", payment_method_id="pm_1", status=status,
                       attempted_at=NOW - timedelta(minutes=minutes_ago))
    for status in ("pending", "processing", "requires_action"):
        assert payment_in_flight(snap(attempts=(tried(status, 10),)), POLICY, NOW) == "attempt_in_flight"
        assert payment_in_flight(snap(attempts=(tried(status, 31),)), POLICY, NOW) is None
    for status in ("failed", "succeeded"):
        assert payment_in_flight(snap(attempts=(tried(status, 10),)), POLICY, NOW) is None
