"""Every call to Stripe asks for the API version the code reads (``STRIPE_API_VERSION``), not the
installed library's default, which moves with its releases: a retry's charge and the reads around it
all carry it."""

from __future__ import annotations

from datetime import UTC, datetime

from stripe import _stripe_client

from app.payments.pay import retry_payment
from app.payments.retries import claim_due
from app.payments.stripe_client import STRIPE_API_VERSION, make_stripe_client
from tests.integration.dunning_setup import failed_invoice, retries


def test_a_retry_asks_stripe_for_the_pinned_api_version(client, accounts, engine, worker, runtime, fake_stripe,
                                                        monkeypatch):
    """Under a library release whose default version differs (as the next major's will), the calls
    still ask for the pinned one."""

    class NextRelease:
        CURRENT = "2027-04-28.next"

    monkeypatch.setattr(_stripe_client, "_ApiVersion", NextRelease)
    account, customer = accounts.create()
    failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    (retry_id,) = claim_due(engine, datetime.now(UTC))

    result = retry_payment(engine, make_stripe_client(runtime.settings), retry_id, datetime.now(UTC))

    assert result.outcome == "sent", result
    assert [r["state"] for r in retries(engine, account)] == ["sent"]
    assert fake_stripe.api_versions and set(fake_stripe.api_versions) == {STRIPE_API_VERSION}
