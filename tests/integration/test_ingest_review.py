"""Webhook ingest, found by review: what Stripe sends that the endpoint must take, and what it
must refuse with a 4xx and a reason (never a 500), through the Flask app on the real database."""

from __future__ import annotations

import json

from tests.conftest import Accounts, post_event
from tests.integration.test_webhook_ingest import count, failed_invoice, queued
from tests.stripe_events import event, unique


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
