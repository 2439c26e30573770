"""A bad-debt payment whose Stripe customer another team moved to another account while it ran.

Ingest routes a payment intent's webhook by its customer, so after the move the outcome of the old
account's payment comes routed to the new account. It is recorded on the payment all the same (found
by the intent id, or by the metadata the payment put on the intent), and the account that made the
payment is recomputed, as well as the one the event was routed to.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import post_event, wait_for
from tests.integration.bad_debt_setup import InBadDebt, dunning_row, intent_event, key, pay, payments, recompute, refund
from tests.integration.test_mirror_filing import move
from tests.integration.test_pay_bad_debt import stuck_rows
from tests.stripe_events import unique


def paying_then_moved(client: Any, engine: Any, accounts: Any, debtor: InBadDebt,
                      stripe_fake: Any) -> tuple[str, dict[str, Any]]:
    """The debtor pays its bad debt (a bank debit: processing), then another team moves its Stripe
    customer to a new account (before beat's refile recomputes either). The new account and the
    payment's answer."""
    stripe_fake.intent_outcome = "processing"
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert response.status_code == 202, response.json
    wait_for(lambda: dunning_row(engine, debtor.account)["status"] == "lifting", message="lifting")
    wait_for(lambda: not requested(engine, debtor.account), message="no recompute of the payer pending")
    new, _ = accounts.create()
    move(engine, debtor.customer, new)
    return new, response.json


def requested(engine: Any, *accounts: str) -> list[str]:
    """Those of ``accounts`` with a recompute request pending (its recompute has not committed)."""
    with engine.connect() as conn:
        return list(conn.exec_driver_sql("SELECT account_id FROM recompute_request WHERE account_id = ANY(%(a)s)",
                                         {"a": list(accounts)}).scalars())


def routed_to(engine: Any, event_id: str) -> str | None:
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT account_id FROM stripe_event WHERE id = %(id)s",
                                    {"id": event_id}).scalar()


@pytest.mark.worker
def test_a_decline_routed_to_the_account_the_customer_moved_to_ends_the_old_accounts_payment(
        client, engine, accounts, debtor, stripe_fake, worker):
    new, paid = paying_then_moved(client, engine, accounts, debtor, stripe_fake)

    evt = intent_event("failed", debtor, paid["stripe_payment_intent_id"], paid["payment_id"], decline="do_not_honor")
    assert post_event(client, evt).json["state"] == "accepted"
    assert routed_to(engine, evt["id"]) == new
    [row] = payments(engine, debtor.account)
    assert (row["state"], row["failure_reason"]) == ("failed", "declined: do_not_honor")
    # The account that made the payment is recomputed: no longer lifting (its debt moved away), and
    # the one the event was routed to owns the debt.
    wait_for(lambda: dunning_row(engine, debtor.account)["status"] == "current", message="the old account recomputed")
    wait_for(lambda: dunning_row(engine, new).get("status") == "bad_debt", message="the new account recomputed")
    assert stripe_fake.invoice_payments() == []


@pytest.mark.worker
def test_a_success_routed_to_the_account_the_customer_moved_to_settles_the_debt_for_both(
        client, engine, runtime, accounts, debtor, stripe_fake, worker):
    new, paid = paying_then_moved(client, engine, accounts, debtor, stripe_fake)
    seen: list[str] = []

    def recompute_the_new_account_meanwhile(method: str, path: str) -> None:
        # The new account's recompute that ingest requested runs while the settlement pays the
        # invoices (another worker), so it still sees them owed.
        if path.endswith("/pay") and not seen:
            seen.append(recompute(engine, runtime, new, "STATE_REFRESH")["status"])

    stripe_fake.on_request = recompute_the_new_account_meanwhile
    evt = intent_event("succeeded", debtor, paid["stripe_payment_intent_id"], paid["payment_id"])
    assert post_event(client, evt).json["state"] == "accepted"
    assert routed_to(engine, evt["id"]) == new
    wait_for(lambda: payments(engine, debtor.account)[0]["state"] == "succeeded", message="the payment settled")
    assert len(seen) == 1 and seen[0] != "current"  # the invoice still owed
    [settled] = stripe_fake.invoice_payments()
    assert settled.path == f"/v1/invoices/{debtor.invoice}/pay"
    wait_for(lambda: dunning_row(engine, debtor.account)["status"] == "current", message="the old account recomputed")
    # The settled invoice is the new account's now: the settlement recomputes it too, and it sees the
    # invoice paid then, not only once Stripe's own invoice.paid comes.
    state = wait_for(lambda: (d := dunning_row(engine, new))["status"] == "current" and d,
                     message="the new account sees the invoice paid")
    assert state["outstanding_amount"] == 0


@pytest.mark.worker
def test_a_refund_after_settlement_routed_to_the_new_account_alerts_on_the_old_one(
        client, engine, accounts, debtor, stripe_fake, worker):
    _new, paid = paying_then_moved(client, engine, accounts, debtor, stripe_fake)
    succeeded = intent_event("succeeded", debtor, paid["stripe_payment_intent_id"], paid["payment_id"])
    assert post_event(client, succeeded).status_code == 200
    wait_for(lambda: payments(engine, debtor.account)[0]["state"] == "succeeded", message="the payment settled")

    refund(client, debtor, paid["stripe_payment_intent_id"])
    [alert] = wait_for(lambda: stuck_rows(engine, "tasks.bad_debt_refund_after_settlement_reviewed"),
                       message="the refund alert")
    assert alert["account_id"] == debtor.account and alert["task_args"] == {"payment_id": paid["payment_id"]}


@pytest.mark.worker
def test_an_intent_naming_a_payment_of_another_account_in_its_metadata_does_not_end_it(
        client, engine, accounts, debtor, stripe_fake, worker):
    """The metadata is read from a webhook: a payment is found by it only with the account it names."""
    _new, paid = paying_then_moved(client, engine, accounts, debtor, stripe_fake)
    other, customer = accounts.create()
    stranger = InBadDebt(other, customer, debtor.invoice, debtor.amount, debtor.payment_method, {})

    evt = intent_event("failed", stranger, unique("pi"), paid["payment_id"], decline="do_not_honor")
    assert post_event(client, evt).json["state"] == "accepted"
    [row] = payments(engine, debtor.account)
    assert row["state"] == "pending"
    assert stuck_rows(engine, "tasks.settle_bad_debt_payment") == []


@pytest.mark.worker
def test_the_account_the_customer_moved_to_cannot_pay_invoices_another_accounts_payment_is_charging(
        client, engine, runtime, accounts, debtor, stripe_fake, worker):
    """The old account's bank debit is still processing: the new account, in bad debt for the same
    invoice, is refused until that payment ends, then pays."""
    new, paid = paying_then_moved(client, engine, accounts, debtor, stripe_fake)
    assert recompute(engine, runtime, new)["status"] == "bad_debt"
    stripe_fake.intent_outcome = "succeeded"

    refused = pay(client, {"account_id": new, "amount": debtor.amount}, key())
    assert refused.status_code == 409, refused.json
    assert refused.json["error"] == "payment_in_flight"
    assert f"bad-debt payment {paid['payment_id']} of account {debtor.account!r}" in refused.json["reason"]
    assert debtor.invoice in refused.json["reason"]
    assert len(stripe_fake.intents_created()) == 1 and payments(engine, new) == []

    declined = intent_event("failed", debtor, paid["stripe_payment_intent_id"], paid["payment_id"],
                            decline="do_not_honor")
    assert post_event(client, declined).json["state"] == "accepted"
    wait_for(lambda: dunning_row(engine, new).get("status") == "bad_debt" and not requested(engine, new),
             message="the new account recomputed")
    response = pay(client, {"account_id": new, "amount": debtor.amount}, key())
    assert response.status_code == 202, response.json
    assert len(stripe_fake.intents_created()) == 2
    assert [p["state"] for p in payments(engine, new)] == ["pending"]


@pytest.mark.worker
def test_an_intent_of_another_customer_naming_the_payment_and_its_account_does_not_end_it(
        client, engine, accounts, debtor, stripe_fake, worker):
    """The account the metadata names is looked at because the intent's customer may have moved; the
    payment found there must still be one charging that customer, not another customer's."""
    _new, paid = paying_then_moved(client, engine, accounts, debtor, stripe_fake)
    other, customer = accounts.create()
    # Routed to the other account (its customer's), with metadata naming the debtor's account and payment.
    stranger = InBadDebt(debtor.account, customer, debtor.invoice, debtor.amount, debtor.payment_method, {})

    evt = intent_event("failed", stranger, unique("pi"), paid["payment_id"], decline="do_not_honor")
    assert post_event(client, evt).json["state"] == "accepted"
    assert routed_to(engine, evt["id"]) == other
    [row] = payments(engine, debtor.account)
    assert (row["state"], row["stripe_payment_intent_id"]) == ("pending", paid["stripe_payment_intent_id"])


def test_a_late_charge_of_a_debt_the_account_it_moved_to_settled_names_that_payment_only(
        client, engine, runtime, accounts, debtor, stripe_fake):
    """The old account's payment failed as never created, the customer moved, the new account paid
    and settled the invoice (300 credited while it ran, which its settlement named), then the old
    payment's charge turned up: all of it is owed back, said once for the invoice, by the payment
    that paid it (not the credit again: the customer would be refunded it twice)."""
    from app.payments.bad_debt_settle import settle
    from tests.integration.test_bad_debt_credit_note import alerts, succeeded
    from tests.integration.test_bad_debt_reconcile import failed_with_a_hidden_charge

    first, late = failed_with_a_hidden_charge(client, engine, runtime, debtor, stripe_fake)
    new, _ = accounts.create()
    move(engine, debtor.customer, new)
    recompute(engine, runtime, debtor.account)
    assert recompute(engine, runtime, new)["status"] == "bad_debt"
    stripe_fake.intent_outcome = "succeeded"
    second = pay(client, {"account_id": new, "amount": debtor.amount}, key())
    assert second.status_code == 202, second.json
    stripe_fake.credit_note(debtor.invoice, 300)
    succeeded(client, debtor, dict(second.json))
    told = settle(runtime, second.json["payment_id"]).details
    assert told == (f"{debtor.invoice}: 300 usd credited by a credit note",)

    assert post_event(client, intent_event("succeeded", debtor, late["id"], first)).status_code == 200
    settled = settle(runtime, first)
    assert settled.details == (f"{debtor.invoice}: also paid by bad-debt payment {second.json['payment_id']}",)
    assert "credited" not in alerts(engine)[-1]["error"]


def test_a_late_charge_names_the_payment_of_an_account_the_customer_passed_through(
        client, engine, runtime, accounts, debtor, stripe_fake):
    """Moved twice (the debtor, then B, then C): B paid and settled the invoice while it owned the
    customer. The debtor's late charge must name B's payment, though B is neither the account that
    made the late payment nor the one that owns the invoice now."""
    from app.payments.bad_debt_settle import settle
    from tests.integration.test_bad_debt_credit_note import succeeded
    from tests.integration.test_bad_debt_reconcile import failed_with_a_hidden_charge

    first, late = failed_with_a_hidden_charge(client, engine, runtime, debtor, stripe_fake)
    between, _ = accounts.create()
    move(engine, debtor.customer, between)
    recompute(engine, runtime, debtor.account)
    assert recompute(engine, runtime, between)["status"] == "bad_debt"
    stripe_fake.intent_outcome = "succeeded"
    second = pay(client, {"account_id": between, "amount": debtor.amount}, key())
    assert second.status_code == 202, second.json
    succeeded(client, debtor, dict(second.json))
    assert settle(runtime, second.json["payment_id"]).outcome == "settled"
    last, _ = accounts.create()
    move(engine, debtor.customer, last)

    assert post_event(client, intent_event("succeeded", debtor, late["id"], first)).status_code == 200
    settled = settle(runtime, first)
    assert settled.details == (f"{debtor.invoice}: also paid by bad-debt payment {second.json['payment_id']}",)
