"""webhooks/store.waves: which events of a batch can share one statement."""

from __future__ import annotations

import json
from typing import Any

from tests.stripe_events import event
from webhooks.mirror import extract
from webhooks.store import Item, waves


def item(evt: dict[str, Any]) -> Item:
    return extract(evt), json.dumps(evt)


def test_unrelated_events_share_one_statement():
    batch = [item(event("invoice.payment_failed", id=f"in_{n}", customer=f"cus_{n}")) for n in range(5)]
    assert waves(batch) == [[0, 1, 2, 3, 4]]


def test_events_of_one_customer_on_different_invoices_share_one_statement():
    batch = [item(event("invoice.payment_failed", id=f"in_{n}", customer="cus_1")) for n in range(3)]
    assert waves(batch) == [[0, 1, 2]]


def test_events_on_one_invoice_keep_their_order_in_separate_statements():
    batch = [item(event("invoice.finalized", id="in_1", customer="cus_1")),
             item(event("invoice.payment_failed", id="in_2", customer="cus_2")),
             item(event("invoice.payment_failed", id="in_1", customer="cus_1")),
             item(event("invoice.paid", id="in_1", customer="cus_1"))]
    assert waves(batch) == [[0, 1], [2], [3]]


def test_a_redelivery_goes_after_the_first_delivery():
    first = event("invoice.payment_failed", id="in_1", customer="cus_1")
    assert waves([item(first), item(first)]) == [[0], [1]]


def test_a_payment_that_looks_its_invoice_up_waits_for_the_invoice_event():
    """invoice_payment.paid finds its account through the invoice row another event writes."""
    invoice = event("invoice.payment_failed", id="in_1", customer="cus_1")
    link = event("invoice_payment.paid", invoice="in_1", paths={"payment.payment_intent": "pi_1"})
    other = event("invoice.payment_failed", id="in_2", customer="cus_2")
    assert waves([item(invoice), item(link), item(other)]) == [[0, 2], [1]]
