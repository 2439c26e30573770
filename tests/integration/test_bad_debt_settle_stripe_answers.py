"""Review (Stripe calls): a settlement call Stripe refused, whose invoice Stripe could not show then."""

from __future__ import annotations

from typing import Any

import pytest
import stripe

from tests.fakes.fake_stripe_payments import RATE_LIMITED
from tests.integration.test_bad_debt_settle_review import charged_payment, overpaid_alerts


def test_an_invoice_closed_by_someone_else_is_named_when_the_read_after_the_refusal_failed(
        client, engine, runtime, debtor, stripe_fake, monkeypatch):
    """Support marked the invoice paid out of band (the customer paid by bank transfer, say) before
    the charged bad-debt payment settled: Stripe refuses the settlement's first call (already paid),
    and the read that tells how the invoice stands is rate limited, so the task fails and runs again.
    The refused call paid nothing: the next run's call is still the first that may have paid, the
    invoice was closed by someone else, and the customer paid twice (an overpayment alert). Counted as
    a call that may have paid, the refusal hid that: no alert, the customer's money kept."""
    from app.payments.bad_debt_settle import settle

    payment_id = charged_payment(client, debtor)
    status, _ = stripe_fake.handle("POST", f"/v1/invoices/{debtor.invoice}/pay", None, {"paid_out_of_band": "true"})
    assert status == 200
    route = stripe_fake._route
    reads: list[str] = []

    def first_read_rate_limited(method: str, path: str, params: dict[str, str]) -> Any:
        if method == "GET" and path == f"/v1/invoices/{debtor.invoice}":
            reads.append(path)
            if len(reads) == 1:
                return RATE_LIMITED
        return route(method, path, params)

    monkeypatch.setattr(stripe_fake, "_route", first_read_rate_limited)
    with pytest.raises(stripe.RateLimitError):
        settle(runtime, payment_id)
    settled = settle(runtime, payment_id)
    assert settled.outcome == "settled"
    assert settled.settled_elsewhere == (debtor.invoice,) and "closed some other way" in settled.details[0]
    [alert] = overpaid_alerts(engine)
    assert alert["task_args"] == {"payment_id": payment_id} and alert["error"].startswith("overpaid:")
    # The question asked again is the refused one (its key, its answer replayed): nothing else was sent.
    keys = [c.idempotency_key for c in stripe_fake.calls if c.path.endswith("/pay") and c.idempotency_key]
    assert keys == [f"bad-debt-settle-{payment_id}-{debtor.invoice}"] * 2
