"""A cancellation or an upgrade's revert waits while the account's recompute is still to run: the
webhook of a payment that takes the request away (the customer paid the upgrade, or the bad debt's
invoice, on the hosted page) is stored, but the recompute queue has not reached it, and the relay runs
on its own queue. Sent then, it reverts an upgrade or cancels a subscription the customer has just paid
for. Once the recompute has run, the request is sent or superseded as the account's state says. A
recompute request pending for over an hour, or parked by a dead recompute, holds nothing. Through the
signed webhooks, real recomputes and the relay against the fake Account Management."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from app.outbox.relay import relay
from tests.conftest import post_event
from tests.integration.bad_debt_setup import DAY, into_bad_debt, recompute
from tests.integration.test_journeys_journeys import invoice_event
from tests.stripe_events import unique, with_product

LATER = timedelta(seconds=31)  # past the 30 s hold


def upgrade_invoice(kind: str, customer: str, sub: str, invoice: str, at: int, created: int) -> dict[str, Any]:
    evt = invoice_event(kind, customer, invoice, at, paid=5000 if kind == "invoice.paid" else 0,
                        product="prod_premium", reason="subscription_update", created=created)
    evt["data"]["object"]["parent"]["subscription_details"]["subscription"] = sub
    return evt


def outbox(engine: Any, account: str) -> dict[str, tuple[str, str | None]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT event_type, state, last_error FROM outbox WHERE account_id = %(a)s "
                                    "AND event_type IN ('UpgradeRevertRequested', 'CancellationRequested')",
                                    {"a": account}).all()
    return {kind: (state, error) for kind, state, error in rows}


def kinds(fake_am: Any, account: str) -> list[str]:
    return [r.body.get("action", r.kind) for r in fake_am.for_account(account)]


def reverting(client: Any, accounts: Any, engine: Any, runtime: Any) -> tuple[str, str, str, str, int]:
    """An upgrade unpaid for 40 days, marked uncollectible: its revert is requested (not sent yet)."""
    account, customer = accounts.create()
    sub, up, now = unique("sub"), unique("in"), int(time.time())
    t0 = now - 40 * DAY
    assert post_event(client, upgrade_invoice("invoice.payment_failed", customer, sub, up, t0, t0 - 3600)).status_code \
        == 200
    assert post_event(client, upgrade_invoice("invoice.marked_uncollectible", customer, sub, up, t0 + 30 * DAY,
                                              t0 - 3600)).status_code == 200
    recompute(engine, runtime, account)
    assert outbox(engine, account)["UpgradeRevertRequested"][0] == "pending"
    return account, customer, sub, up, t0


def test_an_upgrade_paid_before_its_recompute_ran_is_not_reverted(client, accounts, engine, runtime, fake_am):
    account, customer, sub, up, t0 = reverting(client, accounts, engine, runtime)
    # The customer pays the upgrade on the hosted page: the webhook is stored, its recompute queued.
    paid = upgrade_invoice("invoice.paid", customer, sub, up, int(time.time()) - 5, t0 - 3600)
    assert post_event(client, paid).status_code == 200
    report = relay(engine, fake_am.url)
    assert "revert_upgrade" not in kinds(fake_am, account)
    state, error = outbox(engine, account)["UpgradeRevertRequested"]
    assert state == "pending" and error is not None and "recompute of the account" in error
    assert report.held == 1

    recompute(engine, runtime, account)
    relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    assert "revert_upgrade" not in kinds(fake_am, account)
    assert outbox(engine, account)["UpgradeRevertRequested"][0] == "superseded"
    assert fake_am.entitlements(account)[-1].body["entitlements"]["products"]["prod_premium"] == "full"


def test_a_bad_debt_paid_on_the_hosted_page_before_its_recompute_ran_is_not_cancelled(
        client, accounts, engine, runtime, fake_am):
    debt = into_bad_debt(client, engine, runtime, accounts)
    assert outbox(engine, debt.account)["CancellationRequested"][0] == "pending"
    obj = debt.invoice_object
    paid = with_product(invoice_event("invoice.paid", debt.customer, debt.invoice, int(time.time()) - 5,
                                      amount=obj["amount_due"], paid=obj["amount_due"], product="prod_premium",
                                      created=obj["created"]), "prod_premium", obj["amount_due"])
    assert post_event(client, paid).status_code == 200
    relay(engine, fake_am.url)
    assert "cancel" not in kinds(fake_am, debt.account)

    recompute(engine, runtime, debt.account)
    relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    assert "cancel" not in kinds(fake_am, debt.account)
    assert outbox(engine, debt.account)["CancellationRequested"][0] == "superseded"


def test_a_recompute_request_parked_by_a_dead_run_holds_nothing(client, accounts, engine, runtime, fake_am):
    account = reverting(client, accounts, engine, runtime)[0]
    with engine.begin() as conn:  # a webhook of the account stored, its recompute not run
        conn.exec_driver_sql("INSERT INTO recompute_request (account_id, trigger, cause) VALUES (%(a)s, 'MANUAL', "
                             "'test')", {"a": account})
    relay(engine, fake_am.url)
    assert "revert_upgrade" not in kinds(fake_am, account)
    # Parked by a dead recompute: nothing will run it until someone asks again.
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE recompute_request SET parked_touch = touched_at WHERE account_id = %(a)s",
                             {"a": account})
    relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    assert kinds(fake_am, account).count("revert_upgrade") == 1


def test_a_recompute_pending_for_over_an_hour_holds_nothing(client, accounts, engine, runtime, fake_am):
    account = reverting(client, accounts, engine, runtime)[0]
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO recompute_request (account_id, trigger, cause) VALUES (%(a)s, 'MANUAL', "
                             "'test')", {"a": account})
    relay(engine, fake_am.url, now=datetime.now(UTC) + timedelta(hours=1, seconds=1))
    assert kinds(fake_am, account).count("revert_upgrade") == 1
