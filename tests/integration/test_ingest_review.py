"""Webhook ingest, found by review: what Stripe sends that the endpoint must take, and what it
must refuse with a 4xx and a reason (never a 500), through the Flask app on the real database."""

from __future__ import annotations

import json
import random
import string

import pytest

from tests.conftest import Accounts, post_event
from tests.integration.test_group_ingest import flush
from tests.integration.test_webhook_ingest import count, failed_invoice, queued
from tests.stripe_events import event, unique
from webhooks.ingest import EventNotStorable, Ingested


def upcoming_invoice(customer: str) -> dict[str, object]:
    """invoice.upcoming: Stripe's invoice object for it is a preview of the next renewal, and Stripe
    documents that it has no invoice id (the invoice does not exist yet)."""
    evt = event("invoice.finalized", customer=customer, status="draft")
    evt["type"] = "invoice.upcoming"
    evt["data"]["object"]["id"] = None
    return evt


def test_an_upcoming_invoice_is_stored_and_acknowledged(client, accounts: Accounts, engine, settings):
    """An endpoint subscribed to invoice.upcoming (or to every event) got a 400 for each one: Stripe
    redelivers a refused event for three days and flags the endpoint as failing. It is an event this
    product does not act on: stored with its raw body, 200, no mirror row, no recompute."""
    account, customer = accounts.create()
    evt = upcoming_invoice(customer)
    response = post_event(client, evt)
    assert response.status_code == 200, response.json
    assert response.json["state"] == "ignored"
    with engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT state, stripe_customer_id, account_id, raw_body FROM stripe_event "
                                   "WHERE id = %(i)s", {"i": evt["id"]}).one()
    assert (row.state, row.stripe_customer_id, row.account_id) == ("ignored", customer, account)
    assert json.loads(row.raw_body) == evt
    assert count(engine, "SELECT count(*) FROM stripe_invoice") == 0
    assert count(engine, "SELECT count(*) FROM recompute_request") == 0
    assert queued(settings) == 0


def test_an_event_acted_on_without_an_id_is_still_refused(client, accounts: Accounts, engine):
    _, customer = accounts.create()
    evt = failed_invoice(customer)
    evt["data"]["object"]["id"] = None
    response = post_event(client, evt)
    assert response.status_code == 400 and "no id" in response.json["reason"]
    assert count(engine, "SELECT count(*) FROM stripe_event") == 0


def _long_id(prefix: str) -> str:
    """An id of 10,000 characters that do not compress below a btree index entry's limit."""
    rng = random.Random(7)
    return prefix + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(10_000))


def _huge_event_id(customer: str) -> dict[str, object]:
    return event("invoice.payment_failed", id=unique("in"), customer=customer, event_id=_long_id("evt_"))


def _huge_invoice_id(customer: str) -> dict[str, object]:
    return event("invoice.payment_failed", id=_long_id("in_"), customer=customer)


def _huge_customer_id(_customer: str) -> dict[str, object]:
    return event("invoice.payment_failed", id=unique("in"), customer=_long_id("cus_"))


def _huge_intent_id(customer: str) -> dict[str, object]:
    # A payment intent's outcome is stored in its own transaction (it may settle a bad-debt payment).
    return event("payment_intent.payment_failed", id=_long_id("pi_"), customer=customer)


@pytest.mark.parametrize("build", [_huge_event_id, _huge_invoice_id, _huge_customer_id, _huge_intent_id],
                         ids=["event", "invoice", "customer", "payment-intent"])
def test_an_id_too_long_for_an_index_is_a_422_with_a_reason(client, accounts: Accounts, engine, settings, build):
    """An id of kilobytes fits the 512 KB body, but no btree index entry ('index row size exceeds
    btree maximum', SQLSTATE 54000): that was a 500 'unexpected error'. A value nothing can store."""
    _, customer = accounts.create()
    evt = build(customer)
    response = post_event(client, evt)
    assert response.status_code == 422, (response.status_code, response.json)
    assert "cannot be stored" in response.json["reason"]
    assert count(engine, "SELECT count(*) FROM stripe_event") == 0
    assert queued(settings) == 0
    after = post_event(client, failed_invoice(customer))  # the connection is still good
    assert after.status_code == 200 and after.json["state"] == "accepted"


def test_an_id_too_long_for_an_index_fails_alone_in_its_batch(accounts: Accounts, engine, celery_app, settings):
    """The requests waiting with it in one group commit all answered 500 with it; now only it fails."""
    _, customer = accounts.create()
    good, bad = failed_invoice(customer), _huge_invoice_id(customer)
    results = flush(engine, celery_app, good, bad)
    assert isinstance(results[1], EventNotStorable), results[1]
    assert isinstance(results[0], Ingested) and results[0].state == "accepted" and results[0].enqueued
    assert count(engine, "SELECT count(*) FROM stripe_event") == 1
    assert queued(settings) == 1
