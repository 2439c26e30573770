"""Review (Stripe calls): what a retry does with Stripe's answers when Stripe cannot say more."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from app.payments.pay import retry_payment
from app.payments.retries import claim_due
from app.payments.stripe_client import make_stripe_client
from tasks.failures import FailureKind, TaskFailure
from tests.conftest import point_stripe_at
from tests.integration.dunning_setup import failed_invoice, retries
from tests.integration.test_payments_review_payments import StripeWithUncollectible

pytestmark = pytest.mark.worker


@pytest.fixture
def stripe_reads(runtime, monkeypatch) -> Iterator[StripeWithUncollectible]:
    fake = StripeWithUncollectible()
    with fake:
        point_stripe_at(runtime, monkeypatch, fake.url)
        yield fake


@pytest.mark.parametrize("status", [429, 503])
def test_a_retry_refused_for_an_invoice_paid_meanwhile_is_asked_again_when_stripe_cannot_show_it(
        client, accounts, engine, runtime, worker, stripe_reads, status):
    """The customer paid on the hosted page after the claim: Stripe refuses the retry (the invoice is
    not open) and the read that tells why (is it paid or void?) is rate limited or fails. Nothing was
    charged and nothing is wrong with the request: it is not a refusal (dead work for an operator and
    the refused backoff) but a read to make again. The row goes back to the state it was claimed in,
    the task retries by the read's failure class, and the next try finds the invoice paid."""
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    stripe_reads.paid_elsewhere(invoice, customer, 5000)
    reads: list[str] = []

    def read(invoice_id: str) -> None:
        reads.append(invoice_id)
        if len(reads) == 1:  # the read before the charge is answered; the one after the refusal fails
            stripe_reads.read_failure = status

    stripe_reads.on_invoice_read = read
    with pytest.raises(TaskFailure) as failed:
        retry_payment(engine, make_stripe_client(runtime.settings), retry_id, datetime.now(UTC))
    assert failed.value.kind == (FailureKind.RATE_LIMITED if status == 429 else FailureKind.REMOTE_UNAVAILABLE)
    assert [r["state"] for r in retries(engine, account)] == ["dispatched"]
    assert len(stripe_reads.pay_requests(invoice)) == 1 and stripe_reads.charges == []

    stripe_reads.read_failure = None
    result = retry_payment(engine, make_stripe_client(runtime.settings), retry_id, datetime.now(UTC))
    assert (result.outcome, result.detail) == ("skipped", "not due: invoice paid at Stripe when charged")
    assert [r["state"] for r in retries(engine, account)] == ["skipped"]
    assert stripe_reads.charges == []
