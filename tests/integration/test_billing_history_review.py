"""GET /accounts/<id>/billing-history and the support page: what each invoice's row says."""

from __future__ import annotations

import time

from tests.conftest import SUPPORT_TOKEN, Accounts, post_event, service_headers
from tests.stripe_events import event, unique, with_product

DAY = 86400


def test_an_invoice_retried_on_its_payment_intent_counts_every_attempt(client, accounts: Accounts):
    """Stripe retries an invoice on the same PaymentIntent: one attempt row carries every charge.
    The history counted attempt rows, so an invoice charged three times (Stripe's attempt_count 3)
    said 1 attempt, on the API and on the support page."""
    account, customer = accounts.create()
    invoice, intent = unique("in"), unique("pi")
    t0 = int(time.time()) - 5 * DAY
    for n, at in enumerate((t0, t0 + 2 * DAY, t0 + 4 * DAY), start=1):
        failed = with_product(event("invoice.payment_failed", id=invoice, customer=customer, created=at,
                                    attempt_count=n, amount_due=5000, amount_remaining=5000,
                                    paths={"created": t0 - 3600}), "prod_core", 5000)
        assert post_event(client, failed).status_code == 200
        charge = event("charge.failed", id=unique("ch"), customer=customer, payment_intent=intent,
                       payment_method="pm_card", failure_code="card_declined", created=at,
                       paths={"created": at, "outcome.reason": "insufficient_funds"})
        assert post_event(client, charge).status_code == 200

    history = client.get(f"/accounts/{account}/billing-history", headers=service_headers())
    assert history.status_code == 200
    [row] = history.json["invoices"]
    assert (row["id"], row["label"], row["attempts"]) == (invoice, "Past due", 3)
    view = client.get(f"/support/accounts/{account}/state", headers={"Authorization": f"Bearer {SUPPORT_TOKEN}"})
    assert [i["attempts"] for i in view.json["invoices"]] == [3]
