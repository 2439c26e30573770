"""payment_intent.canceled of a regular invoice's intent (Stripe cancels it when the invoice is
voided, or paid out of band). Since API 2025-03-31 an intent names no invoice: the mirror files it by
its time and amount (app/domain/attempts.py), so the cancellation is no attempt of any invoice."""

from __future__ import annotations

import time

from tests.conftest import post_event
from tests.integration.bad_debt_setup import dunning_row, recompute
from tests.stripe_events import event, unique, with_product

DAY = 86400


def cancelled_intent(customer: str, intent: str, amount: int, created: int, **paths) -> dict:
    evt = event("payment_intent.payment_failed", id=intent, customer=customer, amount=amount, created=created,
                paths=paths)
    evt["type"] = "payment_intent.canceled"
    evt["data"]["object"].update(status="canceled", cancellation_reason="void_invoice", canceled_at=created,
                                 last_payment_error=None)
    return evt


def void_then_renew(client, customer: str, voided: str, now: int) -> None:
    """The invoice ``voided`` (created five days ago) voided a minute ago; a renewal invoice finalized
    an hour ago and not yet charged."""
    void = with_product(event("invoice.voided", id=voided, customer=customer, created=now - 60, amount_due=3000,
                              amount_remaining=3000, amount_paid=0, paths={"created": now - 5 * DAY}),
                        "prod_core", 3000)
    assert post_event(client, void).status_code == 200
    renewal = with_product(event("invoice.finalized", id=unique("in"), customer=customer, created=now - 3600,
                                 amount_due=5000, amount_remaining=5000, amount_paid=0,
                                 paths={"created": now - 3600}), "prod_core", 5000)
    assert post_event(client, renewal).status_code == 200


def test_the_cancelled_intent_of_a_voided_invoice_is_no_failure_of_the_open_one(client, engine, runtime, accounts):
    """An invoice voided, its intent cancelled by Stripe; a renewal invoice finalized an hour ago and
    not yet charged. The cancellation, mirrored as a failed attempt and filed under the open invoice
    (the voided one was closed before it), made that invoice unpaid: the account entered dunning
    with nothing failed."""
    account, customer = accounts.create()
    now = int(time.time())
    void_then_renew(client, customer, unique("in"), now)
    assert recompute(engine, runtime, account)["status"] == "current"

    assert post_event(client, cancelled_intent(customer, unique("pi"), 3000, now)).status_code == 200
    summary = recompute(engine, runtime, account)
    assert (summary["status"], dunning_row(engine, account)["level"]) == ("current", "none"), summary


def test_the_cancelled_intent_of_a_voided_invoice_does_not_carry_its_decline_to_the_open_one(client, engine, runtime,
                                                                                           accounts):
    """The voided invoice had failed on a stolen card. Its intent's cancellation moved the attempt's
    time past the void, and the attempt, with its permanent decline, was filed under the renewal."""
    account, customer = accounts.create()
    now = int(time.time())
    voided, intent = unique("in"), unique("pi")
    failed = with_product(event("invoice.payment_failed", id=voided, customer=customer, created=now - 4 * DAY,
                                amount_due=3000, amount_remaining=3000, amount_paid=0, attempt_count=1,
                                paths={"created": now - 5 * DAY}), "prod_core", 3000)
    assert post_event(client, failed).status_code == 200
    declined = event("payment_intent.payment_failed", id=intent, customer=customer, amount=3000, created=now - 4 * DAY,
                     paths={"last_payment_error.decline_code": "stolen_card"})
    assert post_event(client, declined).status_code == 200
    void_then_renew(client, customer, voided, now)
    assert recompute(engine, runtime, account)["status"] == "current"

    evt = cancelled_intent(customer, intent, 3000, now)
    evt["data"]["object"]["last_payment_error"] = declined["data"]["object"]["last_payment_error"]  # Stripe keeps it
    assert post_event(client, evt).status_code == 200
    summary = recompute(engine, runtime, account)
    assert (summary["status"], dunning_row(engine, account)["failure_class"]) == ("current", None), summary
