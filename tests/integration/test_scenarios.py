"""Scenarios through the signed webhook, the real broker and a real worker."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import Accounts, post_event, service_headers, wait_for
from tests.stripe_events import event, unique, with_product

pytestmark = pytest.mark.worker
DAY = 86400


def dunning(client: Any, account: str) -> dict[str, Any]:
    return dict(client.get(f"/accounts/{account}/dunning", headers=service_headers()).json)


def outbox(engine: Any, account: str) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.exec_driver_sql(
            "SELECT event_type FROM outbox WHERE account_id = %(a)s ORDER BY id", {"a": account})]


def failed(customer: str, invoice: str, at: int, *, attempts: int = 1, reason: str = "subscription_cycle",
           product: str = "prod_core", amount: int = 5000) -> dict[str, Any]:
    evt = event("invoice.payment_failed", id=invoice, customer=customer, created=at, attempt_count=attempts,
                billing_reason=reason, amount_due=amount, amount_remaining=amount, paths={"created": at - 3600})
    return with_product(evt, product, amount)


def charge_failed(customer: str, at: int, decline: str, pm: str = "card_old") -> dict[str, Any]:
    return event("charge.failed", id=unique("ch"), customer=customer, payment_intent=unique("pi"),
                 payment_method=pm, failure_code="card_declined", created=at,
                 paths={"created": at, "outcome.reason": decline})


def test_transient_failure_then_success(client, accounts: Accounts, engine, worker):
    account, customer = accounts.create()
    invoice, t0 = unique("in"), int(time.time()) - 2 * DAY
    post_event(client, failed(customer, invoice, t0))
    post_event(client, charge_failed(customer, t0 + 1, "insufficient_funds"))
    state = wait_for(lambda: (s := dunning(client, account))["failure_class"] == "transient" and s,
                     message="transient class from the charge detail")
    assert state["status"] == "past_due" and state["level"] == "notice"
    first_failure = datetime.fromtimestamp(t0, UTC)
    assert datetime.fromisoformat(state["next_retry_at"]) == first_failure + timedelta(days=1)

    post_event(client, event("invoice.paid", id=invoice, customer=customer, created=int(time.time())))
    state = wait_for(lambda: (s := dunning(client, account))["status"] == "current" and s, message="paid")
    assert state["next_retry_at"] is None and state["level"] == "none"
    assert {"DunningEntered", "PaymentFailed", "ConsequenceEased", "DunningResolved"} <= set(outbox(engine, account))
    with engine.connect() as conn:
        payload = conn.exec_driver_sql("SELECT payload FROM outbox WHERE account_id = %(a)s AND "
                                       "event_type = 'DunningResolved'", {"a": account}).scalar_one()
    assert payload["how"] == "paid"


def test_expired_card_is_not_retried_until_a_new_card_is_attached(client, accounts: Accounts, worker):
    account, customer = accounts.create()
    invoice, t0 = unique("in"), int(time.time()) - 4 * DAY
    post_event(client, failed(customer, invoice, t0))
    post_event(client, charge_failed(customer, t0 + 1, "expired_card"))
    state = wait_for(lambda: (s := dunning(client, account))["failure_class"] == "permanent" and s,
                     message="permanent class")
    assert state["next_retry_at"] is None
    assert state["level"] == "restrict_premium"  # permanent for 3+ days
    assert any(r["rule"] == "retry.none_permanent" for r in state["reasons"])

    attached_at = int(time.time()) - 60
    new_card = unique("pm")
    post_event(client, event("payment_method.attached", id=new_card, customer=customer, created=attached_at))
    state = wait_for(lambda: (s := dunning(client, account))["next_retry_at"] is not None and s,
                     message="immediate retry after the new card")
    assert datetime.fromisoformat(state["next_retry_at"]) == datetime.fromtimestamp(attached_at, UTC)
    assert any(r["rule"] == "retry.new_method" and r["facts"]["payment_method"] == new_card
               for r in state["reasons"])


def test_failed_upgrade_never_becomes_bad_debt(client, accounts: Accounts, engine, worker):
    account, customer = accounts.create()
    t0 = int(time.time()) - 60 * DAY
    post_event(client, failed(customer, unique("in"), t0, attempts=7, reason="subscription_update",
                              product="prod_premium_analytics", amount=2500))
    state = wait_for(lambda: (s := dunning(client, account))["status"] == "past_due" and s, message="past_due")
    assert state["bad_debt"] is False
    assert state["level"] == "restrict_premium"
    assert state["entitlements"]["products"] == {"prod_premium_analytics": "withheld"}
    events = outbox(engine, account)
    assert "UpgradeRevertRequested" in events
    assert "BadDebtEntered" not in events and "CancellationRequested" not in events


def test_six_months_unpaid_reaches_suspended(client, accounts: Accounts, engine, worker):
    account, customer = accounts.create()
    t0 = int(time.time()) - 182 * DAY
    post_event(client, failed(customer, unique("in"), t0, attempts=7))
    state = wait_for(lambda: (s := dunning(client, account))["status"] == "bad_debt" and s, message="bad_debt")
    assert state["level"] == "suspended" and state["bad_debt"] is True
    assert state["entitlements"]["products"] == {"prod_core": "revoked"}
    assert {"BadDebtEntered", "CancellationRequested"} <= set(outbox(engine, account))
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT bad_debt FROM subs_account WHERE account_id = %(a)s",
                                    {"a": account}).scalar_one() is True


def test_billing_history_shows_resolved_for_voided_and_paid_for_paid(client, accounts: Accounts, worker):
    account, customer = accounts.create()
    voided, paid, t0 = unique("in"), unique("in"), int(time.time()) - 10 * DAY
    post_event(client, failed(customer, voided, t0))
    post_event(client, failed(customer, paid, t0 + 100))
    post_event(client, event("invoice.voided", id=voided, customer=customer, created=t0 + DAY))
    post_event(client, event("invoice.paid", id=paid, customer=customer, created=t0 + DAY + 1,
                             amount_due=5000, amount_paid=5000, amount_remaining=0))
    wait_for(lambda: dunning(client, account)["status"] == "current", message="both settled")
    response = client.get(f"/accounts/{account}/billing-history", headers=service_headers())
    assert response.status_code == 200
    labels = {i["id"]: i["label"] for i in response.json["invoices"]}
    assert labels == {voided: "Resolved", paid: "Paid"}
    for item in response.json["invoices"]:
        assert {"id", "label", "amount_due", "amount_paid", "status"} <= set(item)


def test_a_bad_debt_voided_after_a_newer_invoice_was_paid_exits_resolved(client, accounts: Accounts, engine,
                                                                          worker):
    """The customer pays the newer invoice by card, the bad debt's own invoice is then voided: the
    void ended it. BadDebtExited, the episode and DunningResolved say "resolved", as the voided
    invoice's billing-history label does, not "paid" for the other invoice."""
    account, customer = accounts.create()
    old, newer, t0 = unique("in"), unique("in"), int(time.time()) - 182 * DAY
    post_event(client, failed(customer, old, t0, attempts=7))
    wait_for(lambda: dunning(client, account)["status"] == "bad_debt", message="bad_debt")
    now = int(time.time())
    post_event(client, failed(customer, newer, now - 2 * DAY))
    post_event(client, event("invoice.paid", id=newer, customer=customer, created=now - DAY,
                             amount_due=5000, amount_paid=5000, amount_remaining=0))
    wait_for(lambda: dunning(client, account)["outstanding_amount"] == 5000, message="the newer invoice paid")
    assert dunning(client, account)["status"] == "bad_debt"
    post_event(client, event("invoice.voided", id=old, customer=customer, created=now - 60))
    wait_for(lambda: dunning(client, account)["status"] == "current", message="the bad debt voided")
    with engine.connect() as conn:
        hows = dict(conn.exec_driver_sql(
            "SELECT event_type, payload->>'how' FROM outbox WHERE account_id = %(a)s "
            "AND event_type IN ('BadDebtExited', 'DunningResolved')", {"a": account}).fetchall())
        exit_how = conn.exec_driver_sql("SELECT exit_how FROM bad_debt_episode WHERE account_id = %(a)s",
                                        {"a": account}).scalar_one()
    assert hows == {"BadDebtExited": "resolved", "DunningResolved": "resolved"} and exit_how == "resolved"
    labels = {i["id"]: i["label"] for i in client.get(f"/accounts/{account}/billing-history",
                                                      headers=service_headers()).json["invoices"]}
    assert labels == {old: "Resolved", newer: "Paid"}


def test_a_bad_debt_the_customer_paid_exits_paid_though_an_invoice_was_voided_before_it(client, accounts: Accounts,
                                                                                         engine, worker):
    """An invoice failed and voided (support forgave it), then an old failed renewal put the account
    in bad debt, which the customer paid by card: BadDebtExited, the episode row (the bad-debt
    report) say "paid". The void, before the bad debt began, made them say "resolved"."""
    account, customer = accounts.create()
    forgiven, renewal, now = unique("in"), unique("in"), int(time.time())
    post_event(client, failed(customer, forgiven, now - 2 * DAY))
    wait_for(lambda: dunning(client, account)["status"] == "past_due", message="past_due")
    post_event(client, event("invoice.voided", id=forgiven, customer=customer, created=now - 120))
    wait_for(lambda: dunning(client, account)["status"] == "current", message="the forgiven invoice voided")
    post_event(client, failed(customer, renewal, now - 182 * DAY, attempts=7))
    wait_for(lambda: dunning(client, account)["status"] == "bad_debt", message="bad_debt")
    post_event(client, event("invoice.paid", id=renewal, customer=customer, created=now - 60,
                             amount_due=5000, amount_paid=5000, amount_remaining=0))
    wait_for(lambda: dunning(client, account)["status"] == "current", message="the bad debt paid")
    with engine.connect() as conn:
        exited = conn.exec_driver_sql("SELECT payload->>'how' FROM outbox WHERE account_id = %(a)s "
                                      "AND event_type = 'BadDebtExited'", {"a": account}).scalar_one()
        exit_how = conn.exec_driver_sql("SELECT exit_how FROM bad_debt_episode WHERE account_id = %(a)s",
                                        {"a": account}).scalar_one()
    assert (exited, exit_how) == ("paid", "paid")


def test_a_dunning_paid_in_full_resolves_paid_though_a_late_failure_dates_it_back_over_a_void(
        client, accounts: Accounts, engine, worker):
    """Dunning 1: an invoice fails and is voided (support forgave it): DunningResolved "resolved".
    Then a renewal's failure arrives three days after it happened (Stripe retries a delivery for
    days): dunning 2 is unpaid since before that void. The customer pays the renewal in full:
    dunning 2's DunningResolved says "paid", as the renewal's label does; it said "resolved", the
    void of dunning 1 counted again because unpaid_since was dated back over it."""
    account, customer = accounts.create()
    forgiven, renewal, now = unique("in"), unique("in"), int(time.time())
    post_event(client, failed(customer, forgiven, now - 2 * DAY))
    wait_for(lambda: dunning(client, account)["status"] == "past_due", message="past_due")
    post_event(client, event("invoice.voided", id=forgiven, customer=customer, created=now - 120))
    wait_for(lambda: dunning(client, account)["status"] == "current", message="the forgiven invoice voided")
    post_event(client, failed(customer, renewal, now - 3 * DAY))
    state = wait_for(lambda: (s := dunning(client, account))["status"] == "past_due" and s, message="dunning 2")
    assert datetime.fromisoformat(state["unpaid_since"]) == datetime.fromtimestamp(now - 3 * DAY, UTC)
    with engine.connect() as conn:
        prior, voided_at = conn.exec_driver_sql(
            "SELECT d.prior_settled_at, i.voided_at FROM subs_dunning d, stripe_invoice i "
            "WHERE d.account_id = %(a)s AND i.id = %(i)s", {"a": account, "i": forgiven}).one()
    post_event(client, event("invoice.paid", id=renewal, customer=customer, created=now - 60,
                             amount_due=5000, amount_paid=5000, amount_remaining=0))
    wait_for(lambda: dunning(client, account)["status"] == "current", message="the renewal paid")
    with engine.connect() as conn:
        hows = [r[0] for r in conn.exec_driver_sql(
            "SELECT payload->>'how' FROM outbox WHERE account_id = %(a)s AND event_type = 'DunningResolved' "
            "ORDER BY id", {"a": account})]
        prior_after, paid_at = conn.exec_driver_sql(
            "SELECT d.prior_settled_at, i.paid_at FROM subs_dunning d, stripe_invoice i "
            "WHERE d.account_id = %(a)s AND i.id = %(i)s", {"a": account, "i": renewal}).one()
    assert hows == ["resolved", "paid"]
    # Dunning 2 began after the void (marked while current, kept from its start, read back by
    # gather), and ended: current again, the mark is the renewal's payment, for the next dunning.
    assert prior is not None and prior == voided_at > datetime.fromtimestamp(now - 3 * DAY, UTC)
    assert prior_after is not None and prior_after == paid_at
    labels = {i["id"]: i["label"] for i in client.get(f"/accounts/{account}/billing-history",
                                                      headers=service_headers()).json["invoices"]}
    assert labels == {forgiven: "Resolved", renewal: "Paid"}
