"""A Stripe customer that another team maps to another account (subs_customer, no event to us) takes
its invoices with it: beat's refile of the mirror recomputes both accounts. The old account kept
the dunning state of invoices it no longer owned until the drift sweep remediated it, which happens
only inside the rollout stage (never while it is off)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from freezegun import freeze_time

from tests.conftest import post_event, wait_for
from tests.fakes import fake_stripe as outcomes
from tests.integration.dunning_setup import dunning_row, failed_invoice, recompute_pending, retries
from tests.integration.journey_views import dunning, support_recompute
from tests.integration.test_journeys_retries import invoice_event
from tests.integration.test_mirror_filing import move
from tests.stripe_events import event, unique


@pytest.mark.worker
def test_a_customer_moved_to_another_account_recomputes_both(client, engine, accounts, celery_app, worker):
    old, customer = accounts.create()
    new, _ = accounts.create()
    failed_invoice(client, engine, old, customer, "insufficient_funds")
    assert dunning_row(engine, old)["status"] == "past_due"

    with engine.begin() as conn:  # Account Management moves the customer
        conn.exec_driver_sql("UPDATE subs_customer SET account_id = %(a)s WHERE stripe_customer_id = %(c)s",
                             {"a": new, "c": customer})
    result = celery_app.tasks["tasks.refile_mirror"].apply().get()
    assert result["recomputes"] == 2  # the old account and the new (the new one's own customer is filed too)

    wait_for(lambda: dunning_row(engine, new).get("status") == "past_due", message="the new account in dunning")
    wait_for(lambda: dunning_row(engine, old).get("status") == "current", message="the old account out of it")
    assert celery_app.tasks["tasks.refile_mirror"].apply().get() == {"filed": 0, "recomputes": 0}  # once


def refile_behind(engine: Any, writer: Any, waiting_for: str, meanwhile: Callable[[], None]) -> Any:
    """A refile in a thread of its own while ``writer`` (an open transaction) holds what it needs: once
    it waits on a lock (its statement starting with ``waiting_for``), ``meanwhile`` runs, then the
    writer commits. The refile's result (it raised nothing)."""
    from app.embedded import poll_until
    from app.sweep.refile import refile_customers
    from tests.integration.test_mirror_filing import waiting_on_a_lock

    outcome: list[object] = []

    def refile() -> None:
        try:
            outcome.append(refile_customers(engine))
        except BaseException as exc:  # reported below
            outcome.append(exc)

    thread = threading.Thread(target=refile)
    thread.start()
    try:
        assert poll_until(lambda: waiting_on_a_lock(engine, waiting_for), timeout=10)
        meanwhile()
    finally:
        writer.commit()
        writer.close()
        thread.join(timeout=10)
    assert len(outcome) == 1 and not isinstance(outcome[0], BaseException), outcome
    return outcome[0]


def test_a_refile_and_an_ingest_in_flight_do_not_deadlock(accounts, engine):
    """Ingest locks the account's request row, then (its mirror trigger) mirror_customer. The refile
    took mirror_customer first and then the moved accounts' request rows: each waited for the other
    until PostgreSQL's deadlock detector failed one. It now requests first, then locks the mirror."""
    from tests.integration.test_mirror_filing import invoice, keys, move
    from webhooks.store import request_recompute

    old, customer = accounts.create()
    new, _ = accounts.create()
    with engine.begin() as conn:
        invoice(conn, "in_moved_a", customer)  # filed under the old account
    move(engine, customer, new)
    writer = engine.connect()  # an ingest transaction in flight, for an event of the old account
    writer.begin()
    request_recompute(writer, old, "PAYMENT_FAILED", "evt_moved")
    refile_behind(engine, writer, "SET LOCAL enable_seqscan = off; EXECUTE dunning_request_recompute",
                  lambda: invoice(writer, "in_moved_b", customer))  # the event's mirror row, after its request
    assert keys(engine, customer) == (new, [new])



def test_a_customer_mapped_again_between_the_read_and_the_filing_recomputes_where_it_was_filed(accounts, engine):
    """The candidates are read without a lock and filed in another transaction, which reads
    subs_customer again. The owner maps the customer to a third account in between (here while the
    filing waits for a mirror writer in flight): its rows were filed under that account, but only the
    accounts read earlier were recomputed, and no later refile sees the move (the filing agrees with
    subs_customer), so that account had none of the invoice's dunning state nor a retry of it."""
    from tests.integration.test_mirror_filing import invoice, keys

    first, customer = accounts.create()
    read, _ = accounts.create()
    mapped, _ = accounts.create()
    ours = [first, read, mapped]
    with engine.begin() as conn:
        invoice(conn, unique("in"), customer)  # filed under the first account
        conn.exec_driver_sql("DELETE FROM recompute_request WHERE account_id = ANY(%(a)s)", {"a": ours})
    move(engine, customer, read)
    writer = engine.connect()  # a mirror writer in flight: the filing waits for it, after its read
    writer.begin()
    invoice(writer, unique("in"), customer)
    # The owner maps the customer again, between the read and the filing.
    done = refile_behind(engine, writer, "LOCK TABLE mirror_customer", lambda: move(engine, customer, mapped))
    assert keys(engine, customer) == (mapped, [mapped])
    requested = {a for a, _ in done.requested}
    assert {first, mapped} <= requested  # the account it left and the one it was filed under
    with engine.connect() as conn:
        pending = set(conn.exec_driver_sql("SELECT account_id FROM recompute_request WHERE account_id = ANY(%(a)s)",
                                           {"a": ours}).scalars())
    assert {first, mapped} <= pending
    assert (customer, first, mapped) in done.moves
    from app.sweep.refile import find_candidates
    assert [c for c in find_candidates(engine) if c[0] == customer] == []  # no later refile sees it

# --- the moved invoice's payment retries ---------------------------------------------------------
# Compute read payment_retry by account: after the move the new account saw none of the retries its
# invoice had already used under the old one (schedule position, free retry, the per-invoice cap),
# and the old account's decision, made before the move, could still charge the invoice.

DAY = 86400


def failed_with_card(client, account: str, customer: str, at: datetime) -> tuple[str, str, str]:
    """An invoice of ``customer`` failing transiently at ``at`` on its default card; -> (invoice, its
    payment intent, the card)."""
    invoice, intent, card = unique("in"), unique("pi"), unique("pm")
    ts = int(at.timestamp())
    with freeze_time(at, tick=True):
        post_event(client, event("customer.updated", id=customer, created=ts - DAY,
                                 paths={"invoice_settings.default_payment_method": card}))
        post_event(client, invoice_event("invoice.payment_failed", customer, invoice, ts, ts - 3600))
        post_event(client, declined_charge(customer, intent, card, ts + 1))
        wait_for(lambda: dunning(client, account)["failure_class"] == "transient", message="transient failure")
    return invoice, intent, card


def declined_charge(customer: str, intent: str, card: str, at: int) -> dict[str, Any]:
    """Stripe's charge.failed of a charge on the invoice's payment intent (each retry confirms it again)."""
    return event("charge.failed", id=unique("ch"), customer=customer, payment_intent=intent, payment_method=card,
                 failure_code="card_declined", created=at,
                 paths={"created": at, "outcome.reason": "insufficient_funds"})


def due(client, account: str, at: datetime) -> bool:
    planned = dunning(client, account).get("next_retry_at")
    return planned is not None and datetime.fromisoformat(planned) <= at


def refile(celery_app) -> dict[str, Any]:
    """Beat's refile of the mirror, which recomputes both accounts of a moved customer."""
    return dict(celery_app.tasks["tasks.refile_mirror"].apply().get())


def retry_states(engine, invoice: str) -> list[str]:
    with engine.connect() as conn:
        return list(conn.exec_driver_sql("SELECT state FROM payment_retry WHERE invoice_id = %(i)s ORDER BY id",
                                         {"i": invoice}).scalars())


def retry_declined(client, engine, celery_app, fake_stripe, account: str, invoice: str, at: datetime,
                   after: Any = None) -> None:
    """Beat dispatches the account's due retry at ``at``, Stripe declines it, the account is recomputed
    (``after``: Stripe's webhooks of the decline, posted once it was charged)."""
    with freeze_time(at, tick=True):
        assert due(client, account, at), dunning(client, account)
        charged, planned = len(fake_stripe.pay_requests(invoice)), dunning(client, account)["next_retry_at"]
        celery_app.send_task("tasks.dispatch_due_retries")
        wait_for(lambda: len(fake_stripe.pay_requests(invoice)) == charged + 1, message=f"charged at {at}")
        if after is not None:
            after()

        def replanned() -> bool:
            state = dunning(client, account)
            return (retry_states(engine, invoice)[-1:] == ["failed"] and state["next_retry_at"] != planned
                    and not any(r["rule"] == "retry.in_flight" for r in state["reasons"]))
        wait_for(replanned, message=f"declined at {at}, recomputed")


def new_default_card(client, customer: str, at: datetime) -> None:
    card, ts = unique("pm"), int(at.timestamp())
    post_event(client, event("payment_method.attached", id=card, customer=customer, created=ts))
    post_event(client, event("customer.updated", id=customer, created=ts + 1,
                             paths={"invoice_settings.default_payment_method": card}))


@pytest.mark.worker
def test_a_moved_invoice_keeps_its_place_in_the_retry_schedule(client, accounts, engine, worker, celery_app,
                                                                fake_stripe):
    """Three scheduled retries declined under the old account (Stripe's charge.failed on the invoice's
    intent for each), then the customer moves: the new account goes on with the fourth retry on its
    day, and the invoice gets the schedule's 6 retries in all, not the schedule again from its start."""
    old, customer = accounts.create()
    new, _ = accounts.create()
    t0 = datetime.now(UTC).replace(microsecond=0)
    invoice, intent, card = failed_with_card(client, old, customer, t0)
    fake_stripe.default = outcomes.decline("insufficient_funds")

    def webhook(at: datetime) -> Any:
        return lambda: post_event(client, declined_charge(customer, intent, card, int(at.timestamp()) + 1))

    for n, day in enumerate((1, 3, 5), start=1):
        at = t0 + timedelta(days=day, minutes=10 * n)  # each after the last one's gap
        retry_declined(client, engine, celery_app, fake_stripe, old, invoice, at, webhook(at))
    assert dunning(client, old)["retries_used"] == 3

    day6 = t0 + timedelta(days=6)
    with freeze_time(day6, tick=True):
        move(engine, customer, new)
        assert refile(celery_app)["recomputes"] == 2
        wait_for(lambda: dunning(client, new).get("status") == "past_due", message="the new account in dunning")
        wait_for(lambda: dunning(client, old).get("status") == "current", message="the old account out of it")
        moved = dunning(client, new)
    assert moved["retries_used"] == 3, moved
    assert datetime.fromisoformat(moved["next_retry_at"]) >= t0 + timedelta(days=7), moved  # retry 4, day 7

    for day in range(6, 21):
        at = t0 + timedelta(days=day, hours=day)
        with freeze_time(at, tick=True):
            planned = due(client, new, at)
        if planned:
            retry_declined(client, engine, celery_app, fake_stripe, new, invoice, at, webhook(at))
    assert len(fake_stripe.pay_requests(invoice)) == 6
    final = dunning(client, new)
    assert final["retries_used"] == 6 and final["next_retry_at"] is None, final
    assert [r["state"] for r in retries(engine, new)] == ["failed"] * 3


@pytest.mark.worker
def test_the_per_invoice_cap_holds_across_the_move(client, accounts, engine, worker, celery_app, fake_stripe):
    """The invoice's 6 scheduled retries declined under the old account, their charges not mirrored
    yet (an endpoint subscribed to invoice events only): 7 charges. Moved, the new account plans
    nothing more; a new card earns its free retry (the 8th charge), and a third card nothing: 8
    charges per invoice, whatever account the invoice is under."""
    old, customer = accounts.create()
    new, _ = accounts.create()
    t0 = datetime.now(UTC).replace(microsecond=0)
    invoice, _, _ = failed_with_card(client, old, customer, t0)
    fake_stripe.default = outcomes.decline("insufficient_funds")
    for n, day in enumerate((1, 3, 5, 7, 10, 14), start=1):
        retry_declined(client, engine, celery_app, fake_stripe, old, invoice, t0 + timedelta(days=day, minutes=10 * n))
    assert len(fake_stripe.pay_requests(invoice)) == 6

    day15 = t0 + timedelta(days=15)
    with freeze_time(day15, tick=True):
        move(engine, customer, new)
        refile(celery_app)
        wait_for(lambda: dunning(client, new).get("status") == "past_due", message="the new account in dunning")
        moved = dunning(client, new)
        assert moved["retries_used"] == 6 and moved["next_retry_at"] is None, moved
        new_default_card(client, customer, day15)
        wait_for(lambda: any(r["rule"] == "retry.new_method" for r in dunning(client, new)["reasons"]),
                 message="the free retry on the new card planned")
    retry_declined(client, engine, celery_app, fake_stripe, new, invoice, day15 + timedelta(minutes=5))
    assert len(fake_stripe.pay_requests(invoice)) == 7  # with the first attempt: 8 charges

    day16 = t0 + timedelta(days=16)
    with freeze_time(day16, tick=True):
        new_default_card(client, customer, day16)
        state = wait_for(lambda: (s := support_recompute(client, new)) and any(
            r["rule"] == "retry.cap_invoice" for r in s["reasons"]) and s, message="the cap reached")
        assert state["next_retry_at"] is None, state
        celery_app.tasks["tasks.dispatch_due_retries"].apply().get()
    assert len(fake_stripe.pay_requests(invoice)) == 7


@pytest.mark.worker
def test_the_old_accounts_decision_charges_no_invoice_that_moved_away(client, accounts, engine, worker, celery_app,
                                                                      fake_stripe):
    """The customer moves while the old account's stored decision has the invoice's retry due (its
    recompute not run yet): beat's dispatch does not claim it for the old account; once the new
    account is recomputed, the retry is claimed and charged for it, once."""
    old, customer = accounts.create()
    new, _ = accounts.create()
    t0 = datetime.now(UTC).replace(microsecond=0)
    invoice, _, _ = failed_with_card(client, old, customer, t0)
    fake_stripe.default = outcomes.decline("insufficient_funds")
    dispatch = celery_app.tasks["tasks.dispatch_due_retries"]
    at = t0 + timedelta(days=1, minutes=10)
    with freeze_time(at, tick=True):
        assert due(client, old, at)
        move(engine, customer, new)
        assert dispatch.apply().get()["claimed"] == 0
        assert retries(engine, old) == []
        refile(celery_app)
        wait_for(lambda: due(client, new, at), message="the new account plans the retry")
        wait_for(lambda: dunning(client, old).get("status") == "current", message="the old account out of it")
        assert dispatch.apply().get()["claimed"] == 1
        wait_for(lambda: [r["state"] for r in retries(engine, new)] == ["failed"], message="charged for the new")
    assert len(fake_stripe.pay_requests(invoice)) == 1
    assert retries(engine, old) == []


@pytest.mark.worker
def test_a_retry_claimed_for_the_old_account_is_not_charged_after_the_move(client, accounts, engine, worker,
                                                                           celery_app, fake_stripe):
    """Claimed by beat for the old account, the customer moved before a worker charged it: the
    charge is not made for an account whose invoice it no longer is (skipped, never charged); the
    new account's dispatch re-arms the same attempt under its own name and charges it once."""
    from app.payments.retries import claim_due

    old, customer = accounts.create()
    new, _ = accounts.create()
    t0 = datetime.now(UTC).replace(microsecond=0)
    invoice, _, _ = failed_with_card(client, old, customer, t0)
    fake_stripe.default = outcomes.decline("insufficient_funds")
    at = t0 + timedelta(days=1, minutes=10)
    with freeze_time(at, tick=True):
        (claimed,) = claim_due(engine, at)
        move(engine, customer, new)
        celery_app.send_task("tasks.retry_payment", [claimed])
        wait_for(lambda: [r["state"] for r in retries(engine, old)] == ["skipped"], message="skipped")
        assert fake_stripe.pay_requests(invoice) == []
        assert "another account" in retries(engine, old)[0]["error"]
        refile(celery_app)
        # (and the refile's recompute of it has run: dispatch claims nothing while one is pending)
        wait_for(lambda: due(client, new, at) and not recompute_pending(engine, new),
                 message="the new account plans the retry")
        celery_app.send_task("tasks.dispatch_due_retries")
        wait_for(lambda: [(r["id"], r["state"]) for r in retries(engine, new)] == [(claimed, "failed")],
                 message="the same attempt re-armed and charged for the new account")
    assert len(fake_stripe.pay_requests(invoice)) == 1


@pytest.mark.worker
def test_a_retry_in_flight_moves_with_its_invoice_for_the_bad_debt_payment(client, accounts, engine, runtime, worker,
                                                                            fake_stripe):
    """A retry sent (Stripe answered 5xx: its outcome comes by webhook) when the customer moves: the
    bad-debt payment of the account that owns the invoice now sees it in flight (the account that
    claimed it still does too: its payment waits a moment, nothing is lost)."""
    from app.payments.pay import retry_charging, retry_payment
    from app.payments.retries import claim_due
    from app.payments.stripe_client import make_stripe_client

    old, customer = accounts.create()
    new, _ = accounts.create()
    t0 = datetime.now(UTC).replace(microsecond=0)
    failed_with_card(client, old, customer, t0)
    at = t0 + timedelta(days=1, minutes=10)
    with freeze_time(at, tick=True):
        fake_stripe.script(outcomes.server_error())
        (claimed,) = claim_due(engine, at)
        assert retry_payment(engine, make_stripe_client(runtime.settings), claimed, at).outcome == "indeterminate"
        move(engine, customer, new)
        with engine.connect() as conn:
            in_flight = {a: retry_charging(conn, a, at, timedelta(minutes=30)) for a in (old, new)}
    assert in_flight == {old: True, new: True}


def test_a_moved_invoice_is_not_retried_while_the_old_accounts_bad_debt_payment_covers_it(client, engine, runtime,
                                                                                         accounts, stripe_fake):
    """The old account, in bad debt, pays its whole balance (a bank debit: processing for days), the
    customer's younger invoice, still in its retry schedule, included. Another team then moves the
    customer: the new account's own bad-debt payments are none, and a retry of that invoice would
    collect it a second time. The new account plans none while the payment that covers it is in
    flight, and the dispatcher would skip one planned before; the retry goes on once the payment has
    ended (here: failed, found by the reconciliation with Stripe)."""
    from app.payments.bad_debt_reconcile import reconcile
    from app.payments.retries import claim_due
    from tests.integration.bad_debt_setup import into_bad_debt, key, pay, payments, recompute

    debt = into_bad_debt(client, engine, runtime, accounts)  # an invoice written off 30 days ago
    old, customer = debt.account, debt.customer
    new, _ = accounts.create()
    ts = int(datetime.now(UTC).timestamp())
    younger, intent = unique("in"), unique("pi")
    failed = invoice_event("invoice.payment_failed", customer, younger, ts, ts - 3600)
    post_event(client, failed)
    post_event(client, declined_charge(customer, intent, debt.payment_method, ts + 1))
    for invoice in (debt.invoice_object, failed["data"]["object"]):
        stripe_fake.add_invoice(invoice)
    assert recompute(engine, runtime, old)["status"] == "bad_debt"
    stripe_fake.intent_outcome = "processing"
    paying = pay(client, {"account_id": old, "amount": debt.amount + 5000}, key())
    assert paying.status_code == 202, paying.json
    [payment] = payments(engine, old)
    assert payment["state"] == "pending" and set(payment["invoice_ids"]) == {debt.invoice, younger}

    move(engine, customer, new)
    recompute(engine, runtime, new)  # as the refile of the move requests it
    recompute(engine, runtime, old)
    held = dunning_row(engine, new)
    assert held["retry_invoice_id"] is None and held["next_retry_at"] is None, held
    assert "retry.held_bad_debt_payment" in [r["rule"] for r in held["reasons"]], held["reasons"]
    later = datetime.now(UTC) + timedelta(days=3)  # past any retry the invoice's schedule would plan
    assert claim_due(engine, later) == []
    assert stripe_fake.invoice_payments() == [] and retries(engine, new) == []

    stripe_fake.set_status(paying.json["stripe_payment_intent_id"], "requires_payment_method", "insufficient_funds")
    assert reconcile(runtime, payment["id"], later).outcome == "failed"
    recompute(engine, runtime, new)  # as the reconciliation requests it (the invoices' owners now)
    planned = dunning_row(engine, new)
    assert planned["retry_invoice_id"] == younger and planned["next_retry_at"] is not None, planned
    at = planned["next_retry_at"] + timedelta(minutes=1)
    assert len(claim_due(engine, at)) == 1  # the payment ended without money: the retry goes on
    assert [r["invoice_id"] for r in retries(engine, new)] == [younger]
