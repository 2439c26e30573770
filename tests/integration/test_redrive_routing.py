"""Beat's re-drive of events whose customer had no account when they arrived (app/redrive.py), under
load: another team maps many customers at once (a migration, a bulk import into subs_customer); and
of events that name no customer, whose invoice or payment intent the mirror did not know yet."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine

from app.recompute.gather import gather
from app.recompute.service import run_recompute
from app.redrive import redrive
from tests.conftest import Accounts, post_event
from tests.integration.test_bad_debt_dispute import dispute_event
from tests.integration.test_webhook_ingest import count, failed_invoice, queued
from tests.stripe_events import event, resource, unique


def test_the_unroutable_re_drive_routes_at_most_its_limit_per_tick_and_loses_none(
        client, accounts: Accounts, engine: Engine, settings, celery_app) -> None:
    """The routing step took every routable event in one transaction, a request round trip per event,
    before the stale requests and due reviews of the same tick: a bulk mapping made one tick as long
    as the backlog (request rows of every account locked until it committed, ingest for them waiting
    on them), and one past the task's hard time limit rolled back and came back the same on every
    tick, holding up the whole re-drive. It now routes at most ``limit`` events a tick, one request
    per account; the others are routed by the next ticks."""
    customers = [unique("cus") for _ in range(3)]
    for customer in (customers[0], *customers):  # the first customer's two events, one each for the others
        response = post_event(client, failed_invoice(customer))
        assert response.status_code == 200 and response.json["state"] == "unroutable"
    assert count(engine, "SELECT count(*) FROM stripe_event WHERE state = 'unroutable'") == 4
    owners = {customer: accounts.create(customer=customer)[0] for customer in customers}  # mapped at once

    assert redrive(engine, celery_app, limit=2)["routed"] == 2
    assert count(engine, "SELECT count(*) FROM stripe_event WHERE state = 'unroutable'") == 2
    assert redrive(engine, celery_app, limit=2)["routed"] == 2
    assert redrive(engine, celery_app, limit=2)["routed"] == 0

    for customer, account in owners.items():  # every event routed to its customer's account
        assert count(engine, "SELECT count(*) FROM stripe_event WHERE stripe_customer_id = %(c)s "
                             "AND (state <> 'accepted' OR account_id IS DISTINCT FROM %(a)s)",
                     c=customer, a=account) == 0
    assert count(engine, "SELECT count(*) FROM recompute_request") == 3  # one pending recompute per account
    assert queued(settings) == 3  # and one message each


def _event_row(engine: Engine, event_id: str) -> Any:
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT state, account_id, stripe_customer_id FROM stripe_event WHERE id = %(i)s",
                                    {"i": event_id}).one()


def _pending_cause(engine: Engine, account: str) -> str | None:
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT cause FROM recompute_request WHERE account_id = %(a)s",
                                    {"a": account}).scalar()


def test_a_payment_that_came_before_its_invoice_is_routed_once_the_invoice_is_mirrored(
        client, accounts: Accounts, engine: Engine, settings, celery_app, runtime) -> None:
    """invoice_payment.paid names its invoice, not its customer: delivered before any event of that
    invoice (Stripe sends them in no set order), it was stored unroutable, and stayed so after the
    invoice's own events had filed the invoice under its account: the re-drive routed by customer
    only, and the event kept nothing else to route it by. The recompute the invoice's event asked for
    could have run before the payment committed (the two in statements of different web processes),
    and nothing asked for another. It is now routed through the invoice and its recompute requested."""
    account, customer = accounts.create()
    invoice_id, intent = unique("in"), unique("pi")
    now = int(time.time())
    link = event("invoice_payment.paid", created=now, invoice=invoice_id, amount_paid=5000, amount_requested=5000,
                 paths={"payment.payment_intent": intent})
    assert post_event(client, link).json["state"] == "unroutable"
    assert redrive(engine, celery_app)["routed"] == 0  # its invoice is not known yet

    invoice = event("invoice.payment_failed", id=invoice_id, customer=customer, created=now - 60)
    response = post_event(client, invoice)
    assert response.json["state"] == "accepted" and response.json["account_id"] == account
    assert queued(settings) == 1
    run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED")  # the invoice's recompute: it took the request

    result = redrive(engine, celery_app)
    assert result["routed"] == 1 and result["sent"] == 1
    assert tuple(_event_row(engine, link["id"])) == ("accepted", account, customer)  # whose, now known
    assert _pending_cause(engine, account) == link["id"]  # a recompute for the payment
    assert queued(settings) == 2
    with engine.connect() as conn:  # what that recompute reads: the payment, mirrored at ingest
        snapshot, _version = gather(conn, account) or (None, 0)
    assert snapshot is not None
    assert [(a.id, a.invoice_id, a.status, a.amount) for a in snapshot.attempts] == [
        (intent, invoice_id, "succeeded", 5000)]
    assert redrive(engine, celery_app)["routed"] == 0  # once


def test_a_dispute_that_came_before_its_payment_intent_is_routed_once_the_intent_is_mirrored(
        client, accounts: Accounts, engine: Engine, settings, celery_app) -> None:
    """A dispute names its charge's payment intent only: one delivered before any event of that intent
    (or with an endpoint that was not subscribed to them yet) stayed unroutable for good."""
    account, customer = accounts.create()
    intent = unique("pi")
    dispute = dispute_event(intent, unique("ch"), 5000)
    assert post_event(client, dispute).json["state"] == "unroutable"
    assert redrive(engine, celery_app)["routed"] == 0

    failed = event("payment_intent.payment_failed", id=intent, customer=customer)
    assert post_event(client, failed).json["account_id"] == account
    assert redrive(engine, celery_app)["routed"] == 1
    assert tuple(_event_row(engine, dispute["id"])) == ("accepted", account, customer)


def test_a_dispute_of_a_payment_known_only_through_its_invoice_is_routed(
        client, accounts: Accounts, engine: Engine, settings, celery_app) -> None:
    """The attempt invoice_payment.paid mirrors names no customer (it is found through its invoice):
    a dispute of that intent found no customer through it, at ingest or in the re-drive."""
    account, customer = accounts.create()
    invoice_id, intent = unique("in"), unique("pi")
    assert post_event(client, event("invoice.paid", id=invoice_id, customer=customer)).json["account_id"] == account
    link = event("invoice_payment.paid", invoice=invoice_id, paths={"payment.payment_intent": intent})
    assert post_event(client, link).json["account_id"] == account
    dispute = dispute_event(intent, unique("ch"), 1000)
    assert post_event(client, dispute).json["state"] == "unroutable"  # not at ingest: its hot path is unchanged

    assert redrive(engine, celery_app)["routed"] == 1
    assert tuple(_event_row(engine, dispute["id"])) == ("accepted", account, customer)


def test_an_invoice_payment_naming_no_payment_intent_is_routed_through_its_invoice(
        client, accounts: Accounts, engine: Engine, settings, celery_app) -> None:
    """An invoice payment whose ``payment`` names no intent (Stripe's invoice_payment fixture; one
    paid by a payment record) has no attempt to link, and was stored unroutable even with its invoice
    known: its invoice's account is refreshed like any of the invoice's events, and, come before the
    invoice, it is re-driven like one that names an intent."""
    account, customer = accounts.create()
    known, unknown = unique("in"), unique("in")
    assert post_event(client, event("invoice.paid", id=known, customer=customer)).json["account_id"] == account
    payment = resource("invoice_payment")["payment"]
    first = event("invoice_payment.paid", invoice=known, payment=payment)
    assert post_event(client, first).json["account_id"] == account
    early = event("invoice_payment.paid", invoice=unknown, payment=payment)
    assert post_event(client, early).json["state"] == "unroutable"
    assert post_event(client, event("invoice.paid", id=unknown, customer=customer)).json["account_id"] == account
    assert redrive(engine, celery_app)["routed"] == 1
    assert tuple(_event_row(engine, early["id"])) == ("accepted", account, customer)
