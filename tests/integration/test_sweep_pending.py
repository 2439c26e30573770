# ruff: noqa: F811
"""The sweep and the recomputes already on their way.

Rule: an account whose recompute is pending (a recompute_request row, queued or taken by a run not
yet committed; its review due, which beat's re-drive requests; an unroutable event whose customer
now maps to it, which the re-drive routes) is not drift. Its stored state lags the mirror by design
until that recompute runs: the sweep neither records nor counts it as drift nor remediates it (a
remediation would take the pending request as its own), it only counts it as ``pending``. A request
parked by a dead recompute is not on its way: that account's drift is drift.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from freezegun import freeze_time
from sqlalchemy import Engine

from app.recompute.service import run_recompute
from app.redrive import redrive
from app.sweep.sweep import Sweeper
from tests.conftest import Accounts, post_event
from tests.integration.test_bad_debt_dispute import dispute_event
from tests.integration.test_sweep import (  # noqa: F401
    Recorder,
    dunning,
    parked_request,
    refuse,
    rollout_off,
    set_stage,
    settle,
    sql,
    unpaid_invoice,
)
from tests.stripe_events import event, unique


def _payment_failed(client, customer: str) -> None:
    """invoice.payment_failed stored by ingest: mirror row + recompute_request, task queued (no worker)."""
    response = post_event(client, event("invoice.payment_failed", id=unique("in"), customer=customer,
                                        created=int(time.time())))
    assert response.status_code == 200


def _requests(engine: Engine, account: str) -> list[tuple[str, str | None]]:
    return [tuple(r) for r in sql(engine, "SELECT trigger, cause FROM recompute_request WHERE account_id = %(a)s",
                                  a=account)]


def test_an_account_whose_webhook_recompute_is_still_queued_is_pending_not_drift(
        client, accounts: Accounts, runtime, engine: Engine, rollout_off: None):
    account, customer = accounts.create()
    settle(engine, runtime.policy, account, datetime.now(UTC))  # current, nothing unpaid
    _payment_failed(client, customer)
    assert _requests(engine, account) == [("PAYMENT_FAILED", _requests(engine, account)[0][1])]

    set_stage(engine, "100")
    report = Sweeper(engine, runtime.policy, refuse).start()
    assert (report.drifted, report.pending, report.enqueued) == (0, 1, 0), report.drifted_accounts
    assert sql(engine, "SELECT count(*) FROM drift_record")[0][0] == 0
    assert sql(engine, "SELECT drifted, enqueued FROM sweep_run")[0] == (0, 0)
    assert [t for t, _ in _requests(engine, account)] == ["PAYMENT_FAILED"]  # the webhook's, untouched


def test_the_webhooks_recompute_keeps_its_trigger_when_a_sweep_ran_first(
        client, accounts: Accounts, runtime, engine: Engine, rollout_off: None):
    """Before, the sweep's DRIFT_DETECTED recompute took the webhook's pending request: the payment
    failure was recorded as caused by the drift sweep and counted as a remediation by the gate."""
    account, customer = accounts.create()
    settle(engine, runtime.policy, account, datetime.now(UTC))
    _payment_failed(client, customer)
    set_stage(engine, "100")
    recorder = Recorder()
    Sweeper(engine, runtime.policy, recorder).start()
    assert recorder.sent == []

    webhook = run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED", datetime.now(UTC), coalesced=True)
    assert webhook.outcome == "changed"
    assert sql(engine, "SELECT last_trigger FROM subs_dunning WHERE account_id = %(a)s", a=account)[0][0] == \
        "PAYMENT_FAILED"


def test_an_account_whose_recompute_is_in_flight_is_pending(
        client, accounts: Accounts, runtime, engine: Engine, rollout_off: None):
    """A run has taken the request (deleted it in its transaction, not committed yet): the sweep's
    snapshot still sees the request and the old state together."""
    account, customer = accounts.create()
    settle(engine, runtime.policy, account, datetime.now(UTC))
    _payment_failed(client, customer)
    with engine.connect() as in_flight:
        in_flight.exec_driver_sql("DELETE FROM recompute_request WHERE account_id = %(a)s", {"a": account})
        report = Sweeper(engine, runtime.policy, refuse).start()
        in_flight.rollback()
    assert (report.drifted, report.pending) == (0, 1), report.drifted_accounts


def test_an_account_whose_review_is_due_is_pending_not_drift(accounts: Accounts, runtime, engine: Engine,
                                                             rollout_off: None):
    """compute stored next_review_at (a level threshold's day); once it is due, beat's re-drive
    requests the recompute within a tick. Before it comes due, the account is not drift either."""
    t0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    account, customer = accounts.create()
    unpaid_invoice(engine, customer, t0 - timedelta(days=6, hours=23))
    settle(engine, runtime.policy, account, t0)
    review = sql(engine, "SELECT next_review_at FROM subs_dunning WHERE account_id = %(a)s", a=account)[0][0]
    assert review is not None
    with freeze_time(review - timedelta(seconds=5)):
        before = Sweeper(engine, runtime.policy, refuse).start()
    assert (before.drifted, before.pending) == (0, 0)
    with freeze_time(review + timedelta(seconds=5)):
        due = Sweeper(engine, runtime.policy, refuse).start()
    assert (due.drifted, due.pending) == (0, 1), due.drifted_accounts
    assert sql(engine, "SELECT count(*) FROM drift_record")[0][0] == 0


def test_an_account_whose_unroutable_event_now_routes_to_it_is_pending(
        client, accounts: Accounts, runtime, engine: Engine, rollout_off: None):
    """The event came before subs_customer mapped its customer; beat's re-drive routes it (and
    requests the recompute) within a tick of the mapping."""
    account = unique("acct")
    customer = unique("cus")
    sql(engine, "INSERT INTO subs_account (account_id) VALUES (%(a)s)", a=account)
    settle(engine, runtime.policy, account, datetime.now(UTC))
    _payment_failed(client, customer)
    assert sql(engine, "SELECT state FROM stripe_event WHERE stripe_customer_id = %(c)s", c=customer)[0][0] == \
        "unroutable"
    sql(engine, "INSERT INTO subs_customer (stripe_customer_id, account_id) VALUES (%(c)s, %(a)s)",
        c=customer, a=account)

    report = Sweeper(engine, runtime.policy, refuse).start()
    assert (report.drifted, report.pending) == (0, 1), report.drifted_accounts


def test_an_account_whose_request_is_parked_by_a_dead_recompute_is_drift(accounts: Accounts, runtime,
                                                                         engine: Engine, rollout_off: None):
    """Nothing re-sends a parked request (app/redrive.py): its account's drift is reported."""
    account, _ = accounts.create()
    settle(engine, runtime.policy, account, datetime.now(UTC))
    sql(engine, "UPDATE subs_dunning SET status = 'bad_debt' WHERE account_id = %(a)s", a=account)
    parked_request(engine, account)

    report = Sweeper(engine, runtime.policy, refuse).start()
    assert (report.drifted, report.pending) == (1, 0)
    assert report.drifted_accounts[0]["account_id"] == account


def _pending_until_the_redrive_routes(engine: Engine, policy, celery_app, account: str, event_id: str) -> None:
    """At stage 100 the sweep counts the account pending (no drift recorded, nothing sent); the next
    re-drive routes the event and requests the account's recompute for it."""
    set_stage(engine, "100")
    recorder = Recorder()
    report = Sweeper(engine, policy, recorder).start()
    assert (report.drifted, report.pending, report.enqueued) == (0, 1, 0), report.drifted_accounts
    assert recorder.sent == []
    assert sql(engine, "SELECT count(*) FROM drift_record")[0][0] == 0
    assert redrive(engine, celery_app)["routed"] == 1  # what the sweep waited for
    assert [cause for _, cause in _requests(engine, account)] == [event_id]


def test_an_account_whose_unroutable_payment_routes_to_it_through_its_invoice_is_pending(
        client, accounts: Accounts, runtime, engine: Engine, rollout_off: None, celery_app):
    """invoice_payment.paid names its invoice, not its customer: delivered before the invoice's own
    event (Stripe's order; two web processes' statements), it is stored unroutable with
    route_invoice_id, and beat's re-drive (every 30 s) routes it through the invoice's mirror row, now
    filed under the account's customer, and requests the account's recompute: that recompute is on
    its way. Before, the pending check looked at the events' customers only, so the sweep recorded
    such an account as drifted and remediated it up to a tick before the re-drive, a remediation the
    rollout gate counts in the stage's health."""
    account, customer = accounts.create()
    invoice_id, intent = unique("in"), unique("pi")
    now = int(time.time())
    link = event("invoice_payment.paid", created=now, invoice=invoice_id, amount_paid=5000, amount_requested=5000,
                 paths={"payment.payment_intent": intent})
    assert post_event(client, link).json["state"] == "unroutable"
    failed = event("invoice.payment_failed", id=invoice_id, customer=customer, created=now - 60)
    assert post_event(client, failed).json["account_id"] == account
    assert sql(engine, "SELECT state, stripe_customer_id, route_invoice_id FROM stripe_event WHERE id = %(e)s",
               e=link["id"])[0] == ("unroutable", None, invoice_id)
    settle(engine, runtime.policy, account, datetime.now(UTC))  # the invoice's recompute: it took the request
    assert _requests(engine, account) == []
    # Its stored state lags what compute decides now (drift made by hand, as in the tests above).
    sql(engine, "UPDATE subs_dunning SET status = 'bad_debt' WHERE account_id = %(a)s", a=account)

    _pending_until_the_redrive_routes(engine, runtime.policy, celery_app, account, link["id"])


def test_an_account_whose_unroutable_dispute_routes_to_it_through_its_payment_is_pending(
        client, accounts: Accounts, runtime, engine: Engine, rollout_off: None, celery_app):
    """A dispute names its payment intent only; an attempt mirrored by invoice_payment.paid names no
    customer, so a dispute of it is stored unroutable with route_payment_intent_id and routed by the
    next re-drive through the invoice the attempt is linked to: pending, as above."""
    account, customer = accounts.create()
    invoice_id, intent = unique("in"), unique("pi")
    assert post_event(client, event("invoice.paid", id=invoice_id, customer=customer)).json["account_id"] == account
    link = event("invoice_payment.paid", invoice=invoice_id, paths={"payment.payment_intent": intent})
    assert post_event(client, link).json["account_id"] == account
    dispute = dispute_event(intent, unique("ch"), 1000)
    assert post_event(client, dispute).json["state"] == "unroutable"
    settle(engine, runtime.policy, account, datetime.now(UTC))  # takes the invoice's request
    assert _requests(engine, account) == []
    sql(engine, "UPDATE subs_dunning SET status = 'bad_debt' WHERE account_id = %(a)s", a=account)

    _pending_until_the_redrive_routes(engine, runtime.policy, celery_app, account, dispute["id"])


def test_an_unroutable_event_whose_invoice_is_another_accounts_leaves_this_one_drift(
        client, accounts: Accounts, runtime, engine: Engine, rollout_off: None):
    """Only the account the event routes to waits for it: a neighbour's drift is still drift."""
    account, _customer = accounts.create()
    other, other_customer = accounts.create()
    invoice_id = unique("in")
    link = event("invoice_payment.paid", invoice=invoice_id, paths={"payment.payment_intent": unique("pi")})
    assert post_event(client, link).json["state"] == "unroutable"
    assert post_event(client, event("invoice.paid", id=invoice_id, customer=other_customer)).json["account_id"] == \
        other
    for a in (account, other):
        settle(engine, runtime.policy, a, datetime.now(UTC))
    sql(engine, "UPDATE subs_dunning SET status = 'bad_debt' WHERE account_id = %(a)s", a=account)

    report = Sweeper(engine, runtime.policy, refuse).start()
    assert (report.drifted, report.pending) == (1, 0)
    assert report.drifted_accounts[0]["account_id"] == account
