"""A bad-debt payment whose settlement failed for good (a dead stuck row: Stripe refused to pay an
invoice out of band, or the settlement killed the worker child running it every time) is an
operator's to look at: README says it is left out of the beat sweep until an operator re-drives it.
The payment is still pending (its charge succeeded, nothing settled), so the reconciliation with
Stripe claimed it too, every hour, found the charge succeeded and sent the very settlement again:
a poison settlement killed a worker child each hour, and a refused one asked Stripe again, while
the row said it waited for an operator."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.payments.bad_debt_reconcile import due
from tasks.bad_debt import SETTLE  # registers the tasks
from tasks.failures import FailureKind, record_stuck, resolve_stuck
from tests.integration.bad_debt_setup import take_queued_settlements
from tests.integration.test_bad_debt_reconcile import LATER, backdate
from tests.integration.test_bad_debt_settle_review import charged_payment


@pytest.mark.parametrize("extra", [{}, {"waited": 2}], ids=["refused", "killed_after_waiting"])
def test_a_payment_whose_settlement_is_dead_is_not_reconciled_until_an_operator_redrives_it(
        client, engine, runtime, settings, debtor, stripe_fake, extra: dict[str, Any]):
    payment_id = charged_payment(client, debtor)
    assert take_queued_settlements(settings) == [payment_id]  # its settlement ran, and failed for good
    args = {"payment_id": payment_id, **extra}
    assert record_stuck(engine, SETTLE, args, debtor.account, FailureKind.PERMANENT_API_ERROR,
                        "NotSettled: Stripe refused to pay the invoice out of band", 1, "dead", per_args=True)
    backdate(engine, payment_id, LATER)  # pending past the guard window, as it stays
    now = datetime.now(UTC)
    calls = len(stripe_fake.calls)

    assert payment_id not in due(runtime, now + LATER)
    assert payment_id not in due(runtime, now + LATER + timedelta(hours=2))
    assert len(stripe_fake.calls) == calls  # nothing asked of Stripe

    # The operator fixed the cause and re-drove it: the row is resolved (or retrying), the payment
    # is an ordinary pending one again.
    resolve_stuck(engine, SETTLE, debtor.account, args)
    assert payment_id in due(runtime, now + LATER + timedelta(hours=3))
