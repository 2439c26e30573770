"""An account in bad debt on a regular invoice whose subscription's upgrade has run out too: Account
Management is asked to cancel the subscription, never also to revert its upgrade (a revert of a
subscription it is cancelling, which it may refuse and block the account's rows on). Through the
signed webhook, a real recompute and the outbox relay against the fake Account Management."""

from __future__ import annotations

import time
from typing import Any

from app.outbox.relay import relay
from tests.conftest import post_event
from tests.integration.bad_debt_setup import dunning_row, recompute
from tests.integration.journey_views import outbox
from tests.stripe_events import event, unique, with_product

DAY = 86400


def marked_uncollectible(customer: str, subscription: str, at: int, *, reason: str, product: str,
                         amount: int) -> tuple[str, dict[str, Any]]:
    invoice = unique("in")
    evt = event("invoice.marked_uncollectible", id=invoice, customer=customer, created=at, billing_reason=reason,
                amount_due=amount, amount_remaining=amount, amount_paid=0, total=amount,
                paths={"created": at - DAY, "parent.subscription_details.subscription": subscription})
    return invoice, with_product(evt, product, amount)


def regular(customer: str, subscription: str, at: int) -> tuple[str, dict[str, Any]]:
    return marked_uncollectible(customer, subscription, at, reason="subscription_cycle", product="prod_core",
                                amount=1000)


def upgrade(customer: str, subscription: str, at: int) -> tuple[str, dict[str, Any]]:
    return marked_uncollectible(customer, subscription, at, reason="subscription_update",
                                product="prod_premium_analytics", amount=2500)


def requests(fake_am: Any, account: str) -> list[tuple[str, Any]]:
    """Account Management's lifecycle calls for the account: (action, subscription or invoice)."""
    return [(r.body["action"], r.body.get("invoice_id") or r.body["subscription_id"])
            for r in fake_am.for_account(account) if r.kind == "cancellations"]


def test_bad_debt_and_a_run_out_upgrade_of_the_same_subscription_cancel_it_without_a_revert(
        client, accounts, engine, runtime, fake_am):
    account, customer = accounts.create()
    subscription, now = unique("sub"), int(time.time())
    _, regular_evt = regular(customer, subscription, now - 30 * DAY)
    _, upgrade_evt = upgrade(customer, subscription, now - 25 * DAY)
    for evt in (regular_evt, upgrade_evt):
        assert post_event(client, evt).status_code == 200
    assert recompute(engine, runtime, account)["status"] == "bad_debt"

    events = outbox(engine, account)
    assert "CancellationRequested" in events and "UpgradeRevertRequested" not in events, events
    row = dunning_row(engine, account)
    assert row["actions_requested"] == [f"cancel:{subscription}"]
    # /pay-bad-debt charges this balance: the upgrade's 2500 with the regular invoice's 1000, so a
    # payment lifting the bad debt pays the upgrade too, and nothing is left to revert.
    assert row["outstanding_amount"] == 3500
    relay(engine, fake_am.url)
    assert requests(fake_am, account) == [("cancel", subscription)]


def test_a_revert_still_waiting_when_the_cancellation_comes_is_not_sent(client, accounts, engine, runtime, fake_am):
    """The upgrade ran out first (its revert written while Account Management was down), the regular
    invoice went bad debt later: when Account Management returns it is asked to cancel, not to revert."""
    account, customer = accounts.create()
    subscription, now = unique("sub"), int(time.time())
    _, upgrade_evt = upgrade(customer, subscription, now - 25 * DAY)
    assert post_event(client, upgrade_evt).status_code == 200
    recompute(engine, runtime, account)
    assert "UpgradeRevertRequested" in outbox(engine, account)

    _, regular_evt = regular(customer, subscription, now - DAY)
    assert post_event(client, regular_evt).status_code == 200
    assert recompute(engine, runtime, account)["status"] == "bad_debt"
    assert dunning_row(engine, account)["actions_requested"] == [f"cancel:{subscription}"]
    report = relay(engine, fake_am.url)
    assert requests(fake_am, account) == [("cancel", subscription)]
    assert report.superseded >= 1
    with engine.connect() as conn:
        revert = conn.exec_driver_sql("SELECT state, last_error FROM outbox WHERE account_id = %(a)s AND "
                                      "event_type = 'UpgradeRevertRequested'", {"a": account}).one()
    assert revert.state == "superseded" and "is no longer requested" in revert.last_error


def test_a_revert_delivered_before_the_cancellation_is_not_sent_again(client, accounts, engine, runtime, fake_am):
    """Reverted while only the upgrade was unpaid, then cancelled for the regular invoice's bad debt:
    the cancellation follows, and no second revert."""
    account, customer = accounts.create()
    subscription, now = unique("sub"), int(time.time())
    upgrade_invoice, upgrade_evt = upgrade(customer, subscription, now - 25 * DAY)
    assert post_event(client, upgrade_evt).status_code == 200
    recompute(engine, runtime, account)
    relay(engine, fake_am.url)
    assert requests(fake_am, account) == [("revert_upgrade", upgrade_invoice)]

    _, regular_evt = regular(customer, subscription, now - DAY)
    assert post_event(client, regular_evt).status_code == 200
    assert recompute(engine, runtime, account)["status"] == "bad_debt"
    assert outbox(engine, account).count("UpgradeRevertRequested") == 1
    relay(engine, fake_am.url)
    assert requests(fake_am, account) == [("revert_upgrade", upgrade_invoice), ("cancel", subscription)]


def voided(customer: str, subscription: str, invoice: str, at: int) -> dict[str, Any]:
    evt = event("invoice.voided", id=invoice, customer=customer, created=at, billing_reason="subscription_cycle",
                status="void", amount_due=1000, amount_remaining=0, amount_paid=0, total=1000,
                paths={"created": at - 30 * DAY, "parent.subscription_details.subscription": subscription})
    return with_product(evt, "prod_core", 1000)


def test_a_revert_requested_after_the_cancellation_was_delivered_is_not_sent(
        client, accounts, engine, runtime, fake_am):
    """The cancellation of the subscription went to Account Management; then the bad debt ended
    otherwise (its invoice voided) with the subscription not yet cancelled at Stripe and its upgrade
    still unpaid, so the account asks for the revert again. A revert of a subscription Account
    Management has been asked to cancel is meaningless (and may be refused, blocking the account's
    rows): it is superseded with a note naming the cancellation, never sent."""
    account, customer = accounts.create()
    subscription, now = unique("sub"), int(time.time())
    regular_invoice, regular_evt = regular(customer, subscription, now - 30 * DAY)
    _, upgrade_evt = upgrade(customer, subscription, now - 25 * DAY)
    for evt in (regular_evt, upgrade_evt):
        assert post_event(client, evt).status_code == 200
    assert recompute(engine, runtime, account)["status"] == "bad_debt"
    relay(engine, fake_am.url)
    assert requests(fake_am, account) == [("cancel", subscription)]

    assert post_event(client, voided(customer, subscription, regular_invoice, now)).status_code == 200
    assert recompute(engine, runtime, account)["status"] == "past_due"
    assert outbox(engine, account).count("UpgradeRevertRequested") == 1  # the account asks for it again
    report = relay(engine, fake_am.url)
    assert requests(fake_am, account) == [("cancel", subscription)]
    assert report.superseded >= 1
    with engine.connect() as conn:
        revert = conn.exec_driver_sql("SELECT state, attempts, last_error FROM outbox WHERE account_id = %(a)s AND "
                                      "event_type = 'UpgradeRevertRequested'", {"a": account}).one()
    assert revert.state == "superseded" and revert.attempts == 0
    assert f"the cancellation of {subscription}" in revert.last_error and "delivered" in revert.last_error


def test_looking_for_a_delivered_cancellation_reads_no_other_history(engine):
    from app.outbox.relay import CANCELLATION_DELIVERED_SQL
    from tests.integration.test_outbox_relay import plan_over_delivered_history

    plan = plan_over_delivered_history(engine, "acct_cancelled_", 50, CANCELLATION_DELIVERED_SQL,
                                       {"account": "acct_cancelled_1", "subscription": "sub_1"})
    assert "ix_outbox_cancellations_delivered" in plan and "Seq Scan" not in plan, plan
