"""Billing-history labels (DESIGN section 4) of invoices as Stripe's webhooks shape them: credit
notes, customer balance, $0 invoices and refunds, through the signed webhook and
GET /accounts/<id>/billing-history."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import Accounts, post_event, service_headers
from tests.stripe_events import event, unique


def labels(client: Any, account: str) -> dict[str, str]:
    response = client.get(f"/accounts/{account}/billing-history", headers=service_headers())
    assert response.status_code == 200
    return {i["id"]: i["label"] for i in response.json["invoices"]}


def paid(customer: str, invoice: str, at: int, **amounts: Any) -> dict[str, Any]:
    amounts.setdefault("billing_reason", "subscription_cycle")
    return event("invoice.paid", id=invoice, customer=customer, created=at, paths={"created": at - 3600}, **amounts)


@pytest.mark.parametrize(("amounts", "expected"), [
    # A trial's (or a 100% discount's) $0 invoice: nothing was owed, nothing forgiven or credited.
    # DESIGN is silent; support reads "Paid" as Stripe shows it, not "Resolved" (which says a debt
    # was closed unpaid).
    ({"total": 0, "subtotal": 0, "amount_due": 0, "amount_paid": 0, "amount_remaining": 0,
      "billing_reason": "subscription_create"}, "Paid"),
    # Credited in full by a credit note before payment: the customer paid nothing.
    ({"total": 5000, "pre_payment_credit_notes_amount": 5000, "amount_due": 0, "amount_paid": 0,
      "amount_remaining": 0}, "Resolved"),
    # Covered by the customer's credit balance: credit, not money collected.
    ({"total": 5000, "starting_balance": -5000, "ending_balance": 0, "amount_due": 0, "amount_paid": 0,
      "amount_remaining": 0}, "Resolved"),
    # Credited in part, the rest paid by card: the customer paid in full what the invoice then asked.
    ({"total": 5000, "pre_payment_credit_notes_amount": 3000, "amount_due": 2000, "amount_paid": 2000,
      "amount_remaining": 0}, "Paid"),
])
def test_a_paid_invoices_label_by_what_paid_it(client, accounts: Accounts, amounts, expected):
    account, customer = accounts.create()
    invoice = unique("in")
    assert post_event(client, paid(customer, invoice, int(time.time()) - 60, **amounts)).status_code == 200
    assert labels(client, account) == {invoice: expected}


@pytest.mark.parametrize("refund_first", [True, False])
@pytest.mark.parametrize(("refunded", "expected"), [(5000, "Resolved"), (1000, "Paid")])
def test_a_refund_labels_the_invoice_whichever_webhook_comes_first(client, accounts: Accounts, refund_first,
                                                                  refunded, expected):
    """The charge refunded in full: Resolved; in part: Paid; the same when charge.refunded is
    delivered before invoice.paid and the invoice payment that links the charge's intent."""
    account, customer = accounts.create()
    invoice, intent, t0 = unique("in"), unique("pi"), int(time.time()) - 600
    refund = event("charge.refunded", id=unique("ch"), customer=customer, payment_intent=intent, amount=5000,
                   amount_refunded=refunded, refunded=refunded == 5000, created=t0 + 60, paths={"created": t0})
    link = event("invoice_payment.paid", id=unique("inpay"), invoice=invoice, amount_paid=5000,
                 amount_requested=5000, created=t0 + 1, paths={"payment.payment_intent": intent, "created": t0})
    settled = paid(customer, invoice, t0 + 1, total=5000, amount_due=5000, amount_paid=5000, amount_remaining=0)
    order = [refund, link, settled] if refund_first else [settled, link, refund]
    for evt in order:
        assert post_event(client, evt).status_code == 200
    assert labels(client, account) == {invoice: expected}


def test_a_draft_invoice_is_not_in_the_billing_history_until_it_is_finalized(client, accounts: Accounts):
    """A draft is no bill yet: Stripe sends the customer nothing, and it may still be edited or
    deleted (a deleted draft's webhook is invoice.deleted, which nothing mirrors). Listed, it read
    "Open" for the hour before a renewal is finalized, and for good once deleted."""
    account, customer = accounts.create()
    invoice, at = unique("in"), int(time.time()) - 600
    draft = event("invoice.finalized", id=invoice, customer=customer, status="draft", created=at,
                  paths={"created": at - 3600})
    draft["type"] = "invoice.updated"  # the same invoice object, before finalization
    assert post_event(client, draft).status_code == 200
    assert labels(client, account) == {}
    finalized = event("invoice.finalized", id=invoice, customer=customer, created=at + 60, paths={"created": at - 3600})
    assert post_event(client, finalized).status_code == 200
    assert labels(client, account) == {invoice: "Open"}


@pytest.mark.parametrize("credit_first", [True, False])
@pytest.mark.parametrize(("credited", "expected"), [(5000, "Resolved"), (1000, "Paid")])
def test_a_credit_note_after_payment_in_the_second_of_the_payment_labels_it_in_either_order(
        client, accounts: Accounts, credit_first, credited, expected):
    """A credit note issued on a paid invoice in the second it was paid (an integration crediting
    on payment): invoice.paid and the invoice.updated that carries post_payment_credit_notes_amount
    tie on the ordering key (same second, both paid). A credit note on a paid invoice cannot be
    voided (Stripe voids only an open invoice's), so the amount only grows: the tie keeps the
    greater. The last delivered won: invoice.paid delivered after the update said Paid for an
    invoice credited in full."""
    account, customer = accounts.create()
    invoice, at = unique("in"), int(time.time()) - 600
    amounts = {"total": 5000, "amount_due": 5000, "amount_paid": 5000, "amount_remaining": 0}
    settled = paid(customer, invoice, at, **amounts)
    credited_note = paid(customer, invoice, at, post_payment_credit_notes_amount=credited, **amounts)
    credited_note["type"] = "invoice.updated"  # the same paid invoice, its credit note counted
    for evt in ([credited_note, settled] if credit_first else [settled, credited_note]):
        assert post_event(client, evt).status_code == 200
    assert labels(client, account) == {invoice: expected}
