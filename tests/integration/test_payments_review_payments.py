"""Review (payments): a retry of an invoice closed at Stripe before its webhook came."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from app.payments.pay import retry_payment
from app.payments.retries import claim_due
from app.payments.stripe_client import make_stripe_client
from tests.conftest import point_stripe_at, post_event, wait_for
from tests.fakes.fake_stripe import FakeStripe
from tests.fakes.server import Answer
from tests.integration.bad_debt_setup import recompute
from tests.integration.dunning_setup import dunning_row, failed_invoice, retries
from tests.stripe_events import resource

pytestmark = pytest.mark.worker


@dataclass
class StripeWithUncollectible(FakeStripe):
    """The fake Stripe, plus invoices marked uncollectible at Stripe: like Stripe, it still pays such
    an invoice (only a paid or void one is refused) and answers it on GET /v1/invoices/<id>."""

    uncollectible: dict[str, dict[str, Any]] = field(default_factory=dict)
    # GET /v1/invoices/<id> answers this status with Stripe's error body (a 503 api_error, a 429
    # rate_limit) while set: Stripe cannot show the invoice right now.
    read_failure: int | None = None

    def mark_uncollectible(self, invoice_id: str, customer: str, amount: int) -> None:
        invoice = resource("invoice")
        invoice.update(id=invoice_id, customer=customer, status="uncollectible", amount_due=amount, amount_paid=0,
                       amount_remaining=amount)
        invoice["status_transitions"]["marked_uncollectible_at"] = int(time.time())
        self.uncollectible[invoice_id] = invoice

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer | None:
        parts = path.split("?")[0].strip("/").split("/")
        reading = method == "GET" and len(parts) == 3 and parts[:2] == ["v1", "invoices"]
        if reading and self.read_failure is not None:
            kind, code = ("rate_limit_error", "rate_limit") if self.read_failure == 429 else ("api_error", None)
            return self.read_failure, {"Request-Id": "req_fake"}, {"error": {"type": kind, "code": code,
                                                                            "message": "try again later"}}
        if reading and parts[2] in self.uncollectible:
            return 200, {"Request-Id": "req_fake"}, self.uncollectible[parts[2]]
        return super()._handle(method, path, headers, body)


@pytest.fixture
def stripe_uncollectible(runtime, monkeypatch):
    with StripeWithUncollectible() as fake:
        point_stripe_at(runtime, monkeypatch, fake.url)
        yield fake


def test_a_retry_of_an_invoice_marked_uncollectible_at_stripe_before_its_webhook_is_not_charged(
        client, accounts, engine, runtime, worker, stripe_uncollectible):
    """Beat claimed a retry; meanwhile the invoice was marked uncollectible at Stripe (written off by
    finance, or by the subscription's settings after its retries) and invoice.marked_uncollectible is
    not in yet. Stripe pays an uncollectible invoice when asked (it refuses only a paid or void one),
    so the retry would collect a written-off debt through the regular path, which bad debt never goes
    through (DESIGN 7). The retry is skipped, nothing charged, the invoice mirrored as Stripe has it."""
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    stripe_uncollectible.mark_uncollectible(invoice, customer, 5000)

    result = retry_payment(engine, make_stripe_client(runtime.settings), retry_id, datetime.now(UTC))
    assert stripe_uncollectible.charges == []
    assert stripe_uncollectible.pay_requests(invoice) == []
    assert (result.outcome, result.detail) == ("skipped", "not due: invoice uncollectible at Stripe when charged")
    assert result.requested
    assert [r["state"] for r in retries(engine, account)] == ["skipped"]
    with engine.connect() as conn:
        status = conn.exec_driver_sql("SELECT status FROM stripe_invoice WHERE id = %(i)s", {"i": invoice}).scalar()
    assert status == "uncollectible"
    assert dunning_row(engine, account)["retry_invoice_id"] == invoice  # the recompute requested decides


@pytest.mark.parametrize("status", [503, 429])
def test_a_retry_whose_invoice_stripe_cannot_show_is_not_charged_blind(
        client, accounts, engine, runtime, worker, stripe_uncollectible, status):
    """The read before the charge (is the invoice written off at Stripe?) failed: a 5xx, a rate limit.
    Paying anyway could collect a written-off debt through the regular path; the retry is not sent,
    goes back to dispatched with a failure its task retries, and the next try reads again."""
    from tasks.failures import TaskFailure

    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    stripe_uncollectible.mark_uncollectible(invoice, customer, 5000)
    stripe_uncollectible.read_failure = status

    with pytest.raises(TaskFailure):
        retry_payment(engine, make_stripe_client(runtime.settings), retry_id, datetime.now(UTC))
    assert stripe_uncollectible.pay_requests(invoice) == [] and stripe_uncollectible.charges == []
    assert [r["state"] for r in retries(engine, account)] == ["dispatched"]

    stripe_uncollectible.read_failure = None  # Stripe answers again: the invoice is written off
    result = retry_payment(engine, make_stripe_client(runtime.settings), retry_id, datetime.now(UTC))
    assert (result.outcome, result.detail) == ("skipped", "not due: invoice uncollectible at Stripe when charged")
    assert stripe_uncollectible.pay_requests(invoice) == []


def test_a_retry_skipped_for_the_account_a_customer_left_is_charged_for_the_account_it_joined(
        client, accounts, engine, runtime, worker, celery_app, fake_stripe):
    """Beat claimed a retry of the customer's invoice; before it was charged, Account Management moved
    the customer to another account, whose dunning now plans that very attempt (same invoice, same day
    of the schedule: the same idempotency key). The retry claimed under the old account is skipped;
    re-armed under its key for the new account it must belong to the new account, or the charge checks
    the old account's decision, which no longer plans it, and skips it at every beat tick for ever."""
    old, customer = accounts.create()
    new, _ = accounts.create()
    invoice = failed_invoice(client, engine, old, customer, "insufficient_funds", days_ago=2)
    (retry_id,) = claim_due(engine, datetime.now(UTC))

    with engine.begin() as conn:  # Account Management moves the customer
        conn.exec_driver_sql("UPDATE subs_customer SET account_id = %(a)s WHERE stripe_customer_id = %(c)s",
                             {"a": new, "c": customer})
    celery_app.tasks["tasks.refile_mirror"].apply().get()
    # The claimed retry follows its invoice: the new account's decision waits for it while in flight.
    wait_for(lambda: dunning_row(engine, new).get("status") == "past_due", message="the new account in dunning")
    wait_for(lambda: dunning_row(engine, old).get("status") == "current", message="the old account out of dunning")

    stripe_client = make_stripe_client(runtime.settings)
    skipped = retry_payment(engine, stripe_client, retry_id, datetime.now(UTC))
    assert (skipped.outcome, skipped.account_id) == ("skipped", new)  # the account recomputed next
    recompute(engine, runtime, new)  # as tasks.retry_payment requests it
    assert dunning_row(engine, new)["retry_invoice_id"] == invoice  # the very attempt
    assert claim_due(engine, datetime.now(UTC)) == [retry_id]  # the same attempt, re-armed under its key
    result = retry_payment(engine, stripe_client, retry_id, datetime.now(UTC))
    assert (result.outcome, result.account_id) == ("sent", new), result
    assert [r["account_id"] for r in retries(engine, new)] == [new]
    assert len(fake_stripe.charges) == 1


def test_a_retry_whose_card_was_detached_after_its_claim_is_not_sent_to_stripe(client, accounts, engine, runtime,
                                                                                fake_stripe):
    """Beat claimed a retry on the card the invoice failed on; the customer then removed that card.
    Its payment_method.detached is stored and the account's recompute queued behind others when the
    worker charges: Stripe refuses a detached method, and the refusal was filed as dead work for an
    operator. The retry is skipped like one whose card was replaced, and compute plans afresh."""
    from tests.stripe_events import event, unique, with_product

    account, customer = accounts.create()
    t = int(time.time()) - 2 * 86400
    invoice = unique("in")
    failed = event("invoice.payment_failed", id=invoice, customer=customer, created=t, amount_due=5000,
                   amount_remaining=5000, amount_paid=0, attempt_count=1, billing_reason="subscription_cycle",
                   paths={"created": t - 86400})
    assert post_event(client, with_product(failed, "prod_core", 5000)).status_code == 200
    charge = event("charge.failed", id=unique("ch"), customer=customer, payment_intent=unique("pi"),
                   failure_code="card_declined", created=t + 1,
                   paths={"created": t + 1, "outcome.reason": "insufficient_funds"})
    assert post_event(client, charge).status_code == 200
    recompute(engine, runtime, account)
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    (row,) = retries(engine, account)
    card = row["payment_method_id"]
    assert card

    attached = event("payment_method.attached", id=card, customer=customer, created=t - 30 * 86400)
    assert post_event(client, attached).status_code == 200
    detached = event("payment_method.attached", id=card, customer=None, created=int(time.time()) - 5)
    detached["type"] = "payment_method.detached"  # no detached envelope in the fixtures: same object, customer null
    assert post_event(client, detached).status_code == 200  # its recompute waits in the queue

    result = retry_payment(engine, make_stripe_client(runtime.settings), retry_id, datetime.now(UTC))
    assert fake_stripe.pay_requests(invoice) == []
    assert result.outcome == "skipped" and "detached" in (result.detail or ""), result
    assert [r["state"] for r in retries(engine, account)] == ["skipped"]
