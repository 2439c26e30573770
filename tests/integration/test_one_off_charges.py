"""A one-off charge (a Checkout purchase, a charge made in the Dashboard) whose payment intent no
invoice names is no attempt of the account's open dunning invoice, end to end from the signed
webhooks (mirror -> gather -> compute): it uses up no retry, no new card's free retry, its decline
is no failure of the invoice and its success no payment of it in flight. A payment of the invoice
Stripe has not linked yet (its amount, on the hosted page) still holds bad debt as in flight."""

from __future__ import annotations

import time
from typing import Any

from tests.conftest import Accounts, post_event
from tests.integration.journey_views import decided, rules
from tests.stripe_events import event, unique, with_product

DAY = 86400
AMOUNT = 5000  # the invoice's
ONE_OFF = 1999  # the one-off purchase's


def free_retry(state: dict[str, Any]) -> list[str]:
    """The cards a new card's free retry is planned on."""
    return [r["facts"].get("payment_method") for r in state["reasons"] if r["rule"] == "retry.new_method"]


def card(client, customer: str, at: int) -> str:
    """A card attached and made the customer's default at ``at``."""
    pm = unique("pm")
    attached = event("payment_method.attached", id=pm, customer=customer, created=at,
                     paths={"card.exp_month": 12, "card.exp_year": 2030, "card.fingerprint": unique("fp")})
    assert post_event(client, attached).status_code == 200
    default = event("customer.updated", id=customer, created=at, paths={"invoice_settings.default_payment_method": pm})
    assert post_event(client, default).status_code == 200
    return pm


def invoice_failed(client, customer: str, at: int, decline: str, pm: str) -> str:
    """The invoice's first payment fails at ``at`` on ``pm``: invoice.payment_failed and its charge."""
    invoice = unique("in")
    failed = event("invoice.payment_failed", id=invoice, customer=customer, created=at, amount_due=AMOUNT,
                   amount_remaining=AMOUNT, amount_paid=0, attempt_count=1, billing_reason="subscription_cycle",
                   paths={"created": at - 3600})
    assert post_event(client, with_product(failed, "prod_core", AMOUNT)).status_code == 200
    charge = event("charge.failed", id=unique("ch"), customer=customer, payment_intent=unique("pi"),
                   payment_method=pm, failure_code="card_declined", amount=AMOUNT, created=at + 1,
                   paths={"created": at + 1, "outcome.reason": decline})
    assert post_event(client, charge).status_code == 200
    return invoice


def charge_succeeded(customer: str, pm: str, at: int, amount: int = ONE_OFF) -> dict[str, Any]:
    """charge.succeeded (the fixtures hold charge.failed: the same charge in Stripe's other state) of
    an intent no invoice names."""
    evt = event("charge.failed", id=unique("ch"), customer=customer, payment_intent=unique("pi"),
                payment_method=pm, amount=amount, status="succeeded", paid=True, captured=True, created=at,
                paths={"created": at, "outcome.reason": None, "outcome.type": "authorized"})
    evt["type"] = "charge.succeeded"
    return evt


def test_a_refunded_one_off_charge_uses_up_no_retry(client, engine, runtime, accounts: Accounts):
    """The audit's case: retries_used went up by one and the next retry moved on in the schedule."""
    account, customer = accounts.create()
    now = int(time.time())
    pm = card(client, customer, now - 10 * DAY)
    invoice_failed(client, customer, now - 4 * DAY, "insufficient_funds", pm)
    before = decided(client, engine, runtime, account)
    assert before["failure_class"] == "transient" and before["next_retry_at"] is not None

    bought = charge_succeeded(customer, pm, now - 7200)
    assert post_event(client, bought).status_code == 200
    refunded = event("charge.refunded", id=bought["data"]["object"]["id"], customer=customer,
                     payment_intent=bought["data"]["object"]["payment_intent"], payment_method=pm, amount=ONE_OFF,
                     amount_refunded=ONE_OFF, created=now - 3600, paths={"created": now - 7200})
    assert post_event(client, refunded).status_code == 200
    after = decided(client, engine, runtime, account)
    assert (after["retries_used"], after["next_retry_at"], after["failure_class"]) == (
        before["retries_used"], before["next_retry_at"], before["failure_class"])


def test_a_one_off_charge_on_a_new_card_leaves_its_free_retry(client, engine, runtime, accounts: Accounts):
    account, customer = accounts.create()
    now = int(time.time())
    old = card(client, customer, now - 10 * DAY)
    invoice_failed(client, customer, now - 4 * DAY, "expired_card", old)
    new = card(client, customer, now - 2 * DAY)
    before = decided(client, engine, runtime, account)
    assert free_retry(before) == [new]

    assert post_event(client, charge_succeeded(customer, new, now - DAY)).status_code == 200
    after = decided(client, engine, runtime, account)
    assert free_retry(after) == [new], rules(after)
    assert after["next_retry_at"] == before["next_retry_at"]


def test_a_declined_one_off_payment_is_no_failure_of_the_invoice(client, engine, runtime, accounts: Accounts):
    account, customer = accounts.create()
    now = int(time.time())
    pm = card(client, customer, now - 10 * DAY)
    invoice_failed(client, customer, now - 4 * DAY, "insufficient_funds", pm)
    before = decided(client, engine, runtime, account)
    assert before["failure_class"] == "transient"

    intent, at = unique("pi"), now - 7200
    declined = event("charge.failed", id=unique("ch"), customer=customer, payment_intent=intent, payment_method=pm,
                     failure_code="card_declined", amount=ONE_OFF, created=at,
                     paths={"created": at, "outcome.reason": "stolen_card"})
    assert post_event(client, declined).status_code == 200
    failed = event("payment_intent.payment_failed", id=intent, customer=customer, amount=ONE_OFF,
                   latest_charge=declined["data"]["object"]["id"], created=at + 1,
                   paths={"last_payment_error.decline_code": "stolen_card"})
    assert post_event(client, failed).status_code == 200
    after = decided(client, engine, runtime, account)
    assert after["failure_class"] == "transient"
    assert (after["retries_used"], after["next_retry_at"]) == (before["retries_used"], before["next_retry_at"])
    assert "retry.none_permanent" not in rules(after)


def uncollectible(client, customer: str, pm: str, now: int) -> None:
    """An invoice that failed 30 days ago and was marked uncollectible since: bad debt."""
    invoice = invoice_failed(client, customer, now - 30 * DAY, "insufficient_funds", pm)
    marked = event("invoice.marked_uncollectible", id=invoice, customer=customer, created=now - 2 * DAY,
                   amount_due=AMOUNT, amount_remaining=AMOUNT, amount_paid=0, attempt_count=4,
                   billing_reason="subscription_cycle", status="uncollectible",
                   paths={"created": now - 30 * DAY - 3600,
                          "status_transitions.marked_uncollectible_at": now - 2 * DAY})
    assert post_event(client, with_product(marked, "prod_core", AMOUNT)).status_code == 200


def test_a_one_off_purchase_is_no_payment_of_the_debt_in_flight(client, engine, runtime, accounts: Accounts):
    account, customer = accounts.create()
    now = int(time.time())
    pm = card(client, customer, now - 40 * DAY)
    uncollectible(client, customer, pm, now)
    bought = charge_succeeded(customer, pm, now - 300)
    assert post_event(client, bought).status_code == 200
    # and its intent's payment_intent.succeeded (the fixtures hold payment_failed: the intent's other state)
    paid = event("payment_intent.payment_failed", id=bought["data"]["object"]["payment_intent"], customer=customer,
                 amount=ONE_OFF, status="succeeded", last_payment_error=None, payment_method=pm,
                 latest_charge=bought["data"]["object"]["id"], created=now - 299)
    paid["type"] = "payment_intent.succeeded"
    assert post_event(client, paid).status_code == 200
    state = decided(client, engine, runtime, account)
    assert "guard.payment_in_flight" not in rules(state)
    assert state["status"] == "bad_debt"


def test_the_invoices_payment_before_its_link_still_holds_bad_debt(client, engine, runtime, accounts: Accounts):
    """The customer pays the invoice on the hosted page: its charge succeeded, the events that link it
    (invoice_payment.paid) and pay the invoice not here yet. Its amount files it under the invoice."""
    account, customer = accounts.create()
    now = int(time.time())
    pm = card(client, customer, now - 40 * DAY)
    uncollectible(client, customer, pm, now)
    assert post_event(client, charge_succeeded(customer, pm, now - 300, AMOUNT)).status_code == 200
    state = decided(client, engine, runtime, account)
    assert "guard.payment_in_flight" in rules(state)
    assert state["status"] != "bad_debt"


def test_another_customers_charge_of_the_invoices_price_is_no_attempt_of_it(client, engine, runtime,
                                                                             accounts: Accounts):
    """An account of two Stripe customers: the second one's purchase, declined, at the price of the
    first one's open invoice. Stripe pays an invoice with its own customer's methods only."""
    account, customer = accounts.create()
    other = unique("cus")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO subs_customer (stripe_customer_id, account_id) VALUES (%(c)s, %(a)s)",
                             {"c": other, "a": account})
    now = int(time.time())
    pm = card(client, customer, now - 10 * DAY)
    invoice_failed(client, customer, now - 4 * DAY, "insufficient_funds", pm)
    before = decided(client, engine, runtime, account)
    assert before["failure_class"] == "transient"

    theirs = card(client, other, now - 10 * DAY)
    declined = event("charge.failed", id=unique("ch"), customer=other, payment_intent=unique("pi"),
                     payment_method=theirs, failure_code="card_declined", amount=AMOUNT, created=now - 7200,
                     paths={"created": now - 7200, "outcome.reason": "stolen_card"})
    assert post_event(client, declined).status_code == 200
    after = decided(client, engine, runtime, account)
    assert after["failure_class"] == "transient"
    assert (after["retries_used"], after["next_retry_at"]) == (before["retries_used"], before["next_retry_at"])
