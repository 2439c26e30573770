"""A bad-debt payment whose Stripe customer another team moved to another account while it ran.

Ingest routes a payment intent's webhook by its customer, so after the move the outcome of the old
account's payment comes routed to the new account. It is recorded on the payment all the same (found
by the intent id, or by the metadata the payment put on the intent), and the account that made the
payment is recomputed, as well as the one the event was routed to.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import post_event, wait_for
from tests.integration.bad_debt_setup import (
    InBadDebt,
    dunning_row,
    intent_event,
    into_bad_debt,
    key,
    pay,
    payments,
    recompute,
    refund,
)
from tests.integration.test_customer_moved import declined_charge
from tests.integration.test_journeys_retries import invoice_event
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
    assert recompute(engine, runtime, new)["status"] == "past_due"  # held while the payment is in flight
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


def a_late_charge_and_the_moved_to_accounts_payment(client: Any, engine: Any, runtime: Any, accounts: Any,
                                                    debtor: InBadDebt, stripe_fake: Any) -> tuple[int, Any, Any]:
    """The debtor's payment failed as never created (its charge hidden, to turn up later), then the
    customer moved to a new account, which pays the debt (its intent to succeed): (the failed
    payment's id, its hidden charge, the new account's 202 answer)."""
    from tests.integration.test_bad_debt_reconcile import failed_with_a_hidden_charge

    first, late = failed_with_a_hidden_charge(client, engine, runtime, debtor, stripe_fake)
    new, _ = accounts.create()
    move(engine, debtor.customer, new)
    recompute(engine, runtime, debtor.account)
    assert recompute(engine, runtime, new)["status"] == "bad_debt"
    stripe_fake.intent_outcome = "succeeded"
    second = pay(client, {"account_id": new, "amount": debtor.amount}, key())
    assert second.status_code == 202, second.json
    return first, late, second


def test_a_late_charge_of_a_debt_the_account_it_moved_to_settled_names_that_payment_only(
        client, engine, runtime, accounts, debtor, stripe_fake):
    """The old account's payment failed as never created, the customer moved, the new account paid
    and settled the invoice (300 credited while it ran, which its settlement named), then the old
    payment's charge turned up: all of it is owed back, said once for the invoice, by the payment
    that paid it (not the credit again: the customer would be refunded it twice)."""
    from app.payments.bad_debt_settle import settle
    from tests.integration.test_bad_debt_credit_note import alerts, succeeded

    first, late, second = a_late_charge_and_the_moved_to_accounts_payment(client, engine, runtime, accounts,
                                                                          debtor, stripe_fake)
    stripe_fake.credit_note(debtor.invoice, 300)
    succeeded(client, debtor, dict(second.json))
    told = settle(runtime, second.json["payment_id"]).details
    assert told == (f"{debtor.invoice}: 3.00 USD credited by a credit note",)

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

    first, late, second = a_late_charge_and_the_moved_to_accounts_payment(client, engine, runtime, accounts,
                                                                          debtor, stripe_fake)
    succeeded(client, debtor, dict(second.json))
    assert settle(runtime, second.json["payment_id"]).outcome == "settled"
    last, _ = accounts.create()
    move(engine, debtor.customer, last)

    assert post_event(client, intent_event("succeeded", debtor, late["id"], first)).status_code == 200
    settled = settle(runtime, first)
    assert settled.details == (f"{debtor.invoice}: also paid by bad-debt payment {second.json['payment_id']}",)


# --- at the instant of the move: the two accounts' payments and retries see each other ----------


def waiting_on_a_payment_lock(engine: Any) -> bool:
    """A session of the test's database waits for an advisory lock (the payment locks are ones)."""
    with engine.connect() as conn:
        return bool(conn.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND wait_event = 'advisory' "
            "AND datname = current_database()").scalar())


def in_the_background(target: Any) -> tuple[threading.Thread, list[Any]]:
    """``target()`` run on a thread of its own, started; its result lands in the list."""
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(target()))
    thread.start()
    return thread, results


def test_two_accounts_paying_the_moved_invoice_at_the_instant_of_the_move_charge_it_once(
        flask_app, engine, runtime, accounts, debtor, stripe_fake, monkeypatch):
    """The debtor's request is quoted before another team moves its customer, and has checked for
    other accounts' payments (under its own account's payment lock) but not committed yet when the
    account the customer moved to pays the same invoice, quoted after the move. The second must wait
    for the first and see its payment in flight: each under its own account's lock alone, both charged."""
    from app.payments import bad_debt

    stripe_fake.intent_outcome = "processing"
    checked, go = threading.Event(), threading.Event()
    check = bad_debt._refuse_covered_elsewhere

    def the_debtor_holds_once_checked(conn, req, debt):
        check(conn, req, debt)
        if req.account_id == debtor.account:
            checked.set()
            go.wait(20)

    monkeypatch.setattr(bad_debt, "_refuse_covered_elsewhere", the_debtor_holds_once_checked)

    def paying(account: str) -> Any:
        return lambda: pay(flask_app.test_client(), {"account_id": account, "amount": debtor.amount}, key())

    first, first_answer = in_the_background(paying(debtor.account))
    assert checked.wait(20)
    new, _ = accounts.create()
    move(engine, debtor.customer, new)
    assert recompute(engine, runtime, new)["status"] == "bad_debt"
    second, second_answer = in_the_background(paying(new))
    wait_for(lambda: not second.is_alive() or waiting_on_a_payment_lock(engine),
             message="the new account's request to finish or wait for the debtor's")
    go.set()
    first.join(20)
    second.join(20)

    [paid], [refused] = first_answer, second_answer
    assert paid.status_code == 202, paid.json
    assert (refused.status_code, refused.json["error"]) == (409, "payment_in_flight"), refused.json
    assert f"bad-debt payment {paid.json['payment_id']} of account {debtor.account!r}" in refused.json["reason"]
    assert len(stripe_fake.intents_created()) == 1 and payments(engine, new) == []


def owing_a_retried_invoice_too(client: Any, engine: Any, runtime: Any, accounts: Any,
                                stripe_fake: Any) -> tuple[InBadDebt, str, datetime]:
    """An account in bad debt (an invoice written off 30 days ago) whose customer's younger invoice
    failed a moment ago and is in its retry schedule: (the debt of both invoices, the younger one,
    a moment after its retry is due)."""
    debt = into_bad_debt(client, engine, runtime, accounts)
    ts = int(datetime.now(UTC).timestamp())
    younger = unique("in")
    failed = invoice_event("invoice.payment_failed", debt.customer, younger, ts, ts - 3600)
    assert post_event(client, failed).status_code == 200
    assert post_event(client, declined_charge(debt.customer, unique("pi"), debt.payment_method, ts + 1)).status_code \
        == 200
    for invoice in (debt.invoice_object, failed["data"]["object"]):
        stripe_fake.add_invoice(invoice)
    assert recompute(engine, runtime, debt.account)["status"] == "bad_debt"
    planned = dunning_row(engine, debt.account)
    assert planned["retry_invoice_id"] == younger and planned["next_retry_at"] is not None, planned
    return replace(debt, amount=debt.amount + 5000), younger, planned["next_retry_at"] + timedelta(minutes=1)


def retrying(runtime: Any, retry_id: int, at: datetime) -> Any:
    from app.payments.pay import retry_payment
    from app.payments.stripe_client import make_stripe_client

    return retry_payment(runtime.engine, make_stripe_client(runtime.settings), retry_id, at)


def test_a_retry_claimed_as_the_old_accounts_payment_commits_skips_the_invoice_it_covers(
        flask_app, client, engine, runtime, accounts, stripe_fake, monkeypatch):
    """The old account's request is quoted (both invoices) before another team moves the customer,
    and has checked for retries in flight but not committed its payment yet when the new account's
    retry of the younger invoice is claimed. The claim must wait for the payment and see it covers
    the invoice (it is not the claiming account's): each under its own account's lock alone, both
    collected the invoice."""
    from app.payments import bad_debt
    from app.payments.retries import claim_due

    debt, _younger, at = owing_a_retried_invoice_too(client, engine, runtime, accounts, stripe_fake)
    stripe_fake.intent_outcome = "processing"
    checked, go = threading.Event(), threading.Event()
    check = bad_debt._refuse_covered_elsewhere

    def the_payment_holds_once_checked(conn, req, quoted):
        check(conn, req, quoted)
        checked.set()
        go.wait(20)

    monkeypatch.setattr(bad_debt, "_refuse_covered_elsewhere", the_payment_holds_once_checked)
    payment, answered = in_the_background(
        lambda: pay(flask_app.test_client(), {"account_id": debt.account, "amount": debt.amount}, key()))
    assert checked.wait(20)
    new, _ = accounts.create()
    move(engine, debt.customer, new)
    assert recompute(engine, runtime, new)["status"] == "bad_debt"
    (retry_id,) = claim_due(engine, at)
    stripe_fake.pay_outcome = "server_error"  # were it charged, its outcome would come by webhook
    retry, retried = in_the_background(lambda: retrying(runtime, retry_id, at))
    wait_for(lambda: not retry.is_alive() or waiting_on_a_payment_lock(engine),
             message="the retry to finish or wait for the payment")
    go.set()
    payment.join(20)
    retry.join(20)

    [answer], [result] = answered, retried
    assert answer.status_code == 202, answer.json
    assert result.outcome == "skipped" and "bad-debt payment" in (result.detail or ""), result
    assert stripe_fake.invoice_payments() == [] and len(stripe_fake.intents_created()) == 1


def test_a_payment_quoted_before_the_move_waits_for_the_new_accounts_retry_being_claimed(
        flask_app, client, engine, runtime, accounts, stripe_fake, monkeypatch):
    """The old account's request is quoted (both invoices) before the move; the new account's retry
    of the younger invoice is being claimed (made charging, not committed yet) when the request
    writes its payment. The payment must wait for the claim and see the retry charging."""
    from app.payments import bad_debt
    from app.payments import pay as paying
    from app.payments.retries import claim_due

    debt, younger, at = owing_a_retried_invoice_too(client, engine, runtime, accounts, stripe_fake)
    claimed, go = threading.Event(), threading.Event()
    claim, insert = paying._claim, bad_debt._insert

    def held_before_its_commit(conn, retry_id, now, guard, *rest):
        found = claim(conn, retry_id, now, guard, *rest)
        claimed.set()
        go.wait(20)
        return found

    retried: list[Any] = []

    def the_new_account_claims_its_retry_first(rt, req, quoted):
        new, _ = accounts.create()
        move(engine, debt.customer, new)
        assert recompute(engine, runtime, new)["status"] == "bad_debt"
        (retry_id,) = claim_due(engine, at)
        monkeypatch.setattr(paying, "_claim", held_before_its_commit)
        retried.append(in_the_background(lambda: retrying(runtime, retry_id, at)))
        assert claimed.wait(20)
        return insert(rt, req, quoted)

    monkeypatch.setattr(bad_debt, "_insert", the_new_account_claims_its_retry_first)
    stripe_fake.pay_outcome = "server_error"  # the retry's outcome comes by webhook
    payment, answered = in_the_background(
        lambda: pay(flask_app.test_client(), {"account_id": debt.account, "amount": debt.amount}, key()))
    wait_for(lambda: not payment.is_alive() or waiting_on_a_payment_lock(engine),
             message="the payment to finish or wait for the retry's claim")
    go.set()
    payment.join(20)
    [(retry, result)] = retried
    retry.join(20)

    [answer] = answered
    assert [r.outcome for r in result] == ["indeterminate"]
    assert [c.path for c in stripe_fake.invoice_payments()] == [f"/v1/invoices/{younger}/pay"]
    assert (answer.status_code, answer.json["error"]) == (409, "payment_in_flight"), answer.json
    assert "automatic payment retry" in answer.json["reason"]
    assert stripe_fake.intents_created() == [] and payments(engine, debt.account) == []


def test_a_payment_quoted_before_the_move_sees_the_retry_the_new_account_sent_since(
        client, engine, runtime, accounts, stripe_fake, monkeypatch):
    """The old account's request is quoted (both invoices) before the move; the new account's retry
    of the younger invoice is claimed and sent before the request writes its payment. That retry is
    neither the paying account's nor of an invoice it owns now, but it is of one this payment covers."""
    from app.payments import bad_debt
    from app.payments.retries import claim_due

    debt, younger, at = owing_a_retried_invoice_too(client, engine, runtime, accounts, stripe_fake)
    insert = bad_debt._insert
    new, _ = accounts.create()
    retried: list[Any] = []

    def the_new_account_retries_first(rt, req, quoted):
        if not retried:
            move(engine, debt.customer, new)
            assert recompute(engine, runtime, new)["status"] == "bad_debt"
            (retry_id,) = claim_due(engine, at)
            stripe_fake.pay_outcome = "server_error"  # its outcome comes by webhook
            retried.append(retrying(runtime, retry_id, at))
        return insert(rt, req, quoted)

    monkeypatch.setattr(bad_debt, "_insert", the_new_account_retries_first)
    answer = pay(client, {"account_id": debt.account, "amount": debt.amount}, key())

    assert [r.outcome for r in retried] == ["indeterminate"]
    assert [c.path for c in stripe_fake.invoice_payments()] == [f"/v1/invoices/{younger}/pay"]
    assert (answer.status_code, answer.json["error"]) == (409, "payment_in_flight"), answer.json
    assert "automatic payment retry" in answer.json["reason"]
    assert stripe_fake.intents_created() == [] and payments(engine, debt.account) == []


def outbox_events(engine: Any, account: str) -> list[str]:
    with engine.connect() as conn:
        return list(conn.exec_driver_sql("SELECT event_type FROM outbox WHERE account_id = %(a)s ORDER BY id",
                                         {"a": account}).scalars())


def reasons(state: dict[str, Any]) -> list[str]:
    return [r["rule"] for r in state["reasons"]]


@pytest.mark.worker
def test_the_account_the_customer_moved_to_is_not_put_in_bad_debt_while_the_old_accounts_payment_runs(
        client, engine, runtime, accounts, debtor, stripe_fake, worker):
    """The old account's bank debit is processing (for days) when another team moves its customer.
    The new account owns the written-off invoice now, and its own bad-debt payments are none: it
    entered bad debt and its cancellation went out while the customer was paying (DESIGN 6). It is
    held below bad debt until the payment's outcome; declined, the new account enters bad debt."""
    cancel = [a for a in dunning_row(engine, debtor.account)["actions_requested"] if a.startswith("cancel:")]
    assert cancel  # the debt's consequence: the subscription's cancellation
    new, paid = paying_then_moved(client, engine, accounts, debtor, stripe_fake)

    held = recompute(engine, runtime, new, "STATE_REFRESH")  # as the refile of the move requests it
    assert held["status"] == "past_due", held
    state = dunning_row(engine, new)
    assert state["level"] != "suspended" and state["actions_requested"] == []
    assert "guard.payment_elsewhere" in reasons(state)
    events = outbox_events(engine, new)
    assert events and not {"BadDebtEntered", "CancellationRequested"} & set(events), events
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT bad_debt FROM subs_account WHERE account_id = %(a)s",
                                    {"a": new}).scalar() is False

    evt = intent_event("failed", debtor, paid["stripe_payment_intent_id"], paid["payment_id"], decline="do_not_honor")
    assert post_event(client, evt).json["state"] == "accepted"
    wait_for(lambda: dunning_row(engine, new).get("status") == "bad_debt" and not requested(engine, new),
             message="the new account enters bad debt once the payment failed")
    assert dunning_row(engine, new)["actions_requested"] == cancel
    assert {"BadDebtEntered", "CancellationRequested"} <= set(outbox_events(engine, new))


@pytest.mark.worker
def test_a_payment_found_failed_by_reconciliation_recomputes_the_account_its_customer_moved_to(
        client, engine, runtime, accounts, debtor, stripe_fake, worker):
    """The failure may never come as a webhook (routed by its customer, to the new account): beat's
    reconciliation with Stripe finds it. It ends the new account's hold too, so it recomputes it."""
    from app.payments.bad_debt_reconcile import reconcile

    new, paid = paying_then_moved(client, engine, accounts, debtor, stripe_fake)
    assert recompute(engine, runtime, new)["status"] == "past_due"

    stripe_fake.set_status(paid["stripe_payment_intent_id"], "requires_payment_method", "insufficient_funds")
    result = reconcile(runtime, paid["payment_id"], datetime.now(UTC) + timedelta(hours=1))
    assert result.outcome == "failed"
    assert requested(engine, new) == [new]  # and the task enqueues it
    assert result.owners_to_enqueue == (new,)
    assert recompute(engine, runtime, new)["status"] == "bad_debt"
