"""A retry the refused backoff moves past its card's expiry is not planned on that card.

Found by the time audit: after Stripe refused a retry unsent (a revoked key, say) the next one waits
REFUSED_BACKOFF (6 h) from the refusal, but that wait was applied after the card was chosen, and the
card was checked against the retry's earlier time only: refused on the last evening of the card's
expiry month, the retry was planned on it for the small hours of the next month, when Stripe declines
it (expired_card). The payment path skips it unsent since 4b2757f, but until then the decision named a
retry no card could take, and held the invoice's dunning as not run out. The backoff is now part of
the retry's day before any card is chosen: the next card (here the failed one, once the default has
expired), or none.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.domain.compute import compute
from app.domain.retry_cadence import REFUSED_BACKOFF
from app.domain.snapshot import Attempt, Invoice, InvoiceLine, PaymentMethod, Retry, Snapshot, Subscription
from tests.unit.builders import policy

FAILED_AT = datetime(2026, 11, 28, 20, 30, tzinfo=UTC)
REFUSED_AT = datetime(2026, 11, 30, 20, 0, tzinfo=UTC)  # its backoff ends on 1 December, 02:00 UTC
NOW = REFUSED_AT + timedelta(minutes=5)


def _snapshot(*methods: PaymentMethod, default: str) -> Snapshot:
    invoice = Invoice(id="in_1", status="open", billing_reason="subscription_cycle", subscription_id="sub_1",
                      amount_due=5000, amount_paid=0, amount_remaining=5000, created=FAILED_AT - timedelta(hours=1),
                      lines=(InvoiceLine("prod_core", 5000),), attempt_count=1, first_failed_at=FAILED_AT,
                      last_failed_at=FAILED_AT)
    failed = Attempt("pi_1", "in_1", "pm_1", "failed", FAILED_AT, decline_code="insufficient_funds")
    refused = Retry("in_1", default, 1, False, "refused", REFUSED_AT, REFUSED_AT)
    return Snapshot(account_id="acct_1", stored=None, invoices=(invoice,), attempts=(failed,), payment_methods=methods,
                    default_payment_method_id=default, default_payment_method_changed_at=FAILED_AT - timedelta(days=90),
                    subscriptions=(Subscription("sub_1", "active", ("prod_core",)),), retries=(refused,))


def _card(pm: str, month: int, year: int) -> PaymentMethod:
    return PaymentMethod(pm, "card", True, FAILED_AT - timedelta(days=300), exp_month=month, exp_year=year)


def test_no_retry_after_the_refused_backoff_on_a_card_expired_by_then():
    decision = compute(_snapshot(_card("pm_1", 11, 2026), default="pm_1"), policy(), NOW)
    state = decision.state
    assert (state.next_retry_at, state.retry_payment_method_id) == (None, None), state.reasons
    assert any(r.rule == "retry.none_no_method" and r.facts.get("expired") == ["pm_1"] for r in state.reasons)


def test_the_refused_backoff_goes_on_the_next_card_when_the_default_has_expired_by_then():
    # The default card is valid through November; the card that failed, through 2028.
    snap = _snapshot(_card("pm_1", 5, 2028), _card("pm_2", 11, 2026), default="pm_2")
    state = compute(snap, policy(), NOW).state
    assert (state.next_retry_at, state.retry_payment_method_id) == (REFUSED_AT + REFUSED_BACKOFF, "pm_1")
    assert any(r.rule == "retry.refused_backoff" for r in state.reasons)


def test_a_card_valid_after_the_backoff_keeps_its_retry_then():
    state = compute(_snapshot(_card("pm_1", 12, 2026), default="pm_1"), policy(), NOW).state
    assert (state.next_retry_at, state.retry_payment_method_id) == (REFUSED_AT + REFUSED_BACKOFF, "pm_1")
    assert any(r.rule == "retry.refused_backoff" for r in state.reasons)
