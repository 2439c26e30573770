"""Clock skew between worker hosts never moves an account's decisions back in time.

Each host computes at its own clock. At a level's day boundary a host whose clock runs ahead
escalates the account; a recompute on a host whose clock runs behind, with nothing changed, used to
ease it again (and the next one escalate it again): entitlements flapping, and ConsequenceEased /
ConsequenceEscalated events Account Management and the support history show for what never
happened. A recompute computes at the later of its host's clock and the stored decision's time
(subs_dunning.changed_at, read by the same gather); the drift sweep compares the stored decision
with one computed at that moment too, so a sweep host behind sees no drift from the skew alone."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from celery import Celery
from freezegun import freeze_time
from sqlalchemy import Engine

from app.recompute.service import run_recompute
from app.sweep.sweep import Sweeper
from tests.conftest import post_event, service_headers
from tests.integration.dunning_setup import dunning_row
from tests.integration.test_recompute_clock import outbox_events, stored_state, unpaid_since_days_ago
from tests.stripe_events import event, unique, with_product

SKEW = timedelta(seconds=1)


def recompute_on_a_host(celery_app: Celery, account: str) -> dict:
    """tasks.recompute_account as a worker host runs it: its clock is the (frozen) wall clock."""
    import tasks.recompute  # noqa: F401  registers the task

    task = celery_app.tasks["tasks.recompute_account"]
    return task.apply(args=[account, "STATE_REFRESH", "webhook"], throw=True).get()


def escalated_by_a_host_ahead(client, accounts, engine: Engine, runtime, celery_app: Celery):
    """An account unpaid for almost 7 days, escalated to restrict_premium by host A, whose clock
    reads a second past the boundary: (account, boundary, version, events so far)."""
    account, unpaid_since = unpaid_since_days_ago(client, engine, runtime, accounts, 6, "insufficient_funds")
    assert stored_state(engine, account) == ("past_due", "notice")
    boundary = unpaid_since + timedelta(days=7)  # restrict_premium from here
    with freeze_time(boundary + SKEW):
        recompute_on_a_host(celery_app, account)
    assert stored_state(engine, account) == ("past_due", "restrict_premium")
    return account, boundary, dunning_row(engine, account)["version"], outbox_events(engine, account)


def test_a_host_behind_does_not_ease_what_a_host_ahead_escalated(client, accounts, engine, runtime, celery_app):
    account, boundary, version, events = escalated_by_a_host_ahead(client, accounts, engine, runtime, celery_app)
    assert "ConsequenceEscalated" in events, events

    # Host B, a second behind the boundary: nothing changed in reality.
    with freeze_time(boundary - SKEW):
        result = recompute_on_a_host(celery_app, account)

    assert result["outcome"] == "unchanged", result
    assert stored_state(engine, account) == ("past_due", "restrict_premium")
    assert dunning_row(engine, account)["version"] == version
    assert outbox_events(engine, account) == events  # no ConsequenceEased, no EntitlementsChanged

    # Host A again: nothing to escalate a second time.
    with freeze_time(boundary + SKEW):
        assert recompute_on_a_host(celery_app, account)["outcome"] == "unchanged"
    assert outbox_events(engine, account) == events


def test_a_host_behind_still_applies_what_changed_in_reality(client, accounts, engine, runtime, celery_app):
    """The later moment is only a floor for the clock: a fact the host behind sees (the invoice paid)
    still changes the decision, computed at the stored decision's time."""
    account, boundary, _, _ = escalated_by_a_host_ahead(client, accounts, engine, runtime, celery_app)
    with engine.begin() as conn:  # the mirror as ingest leaves it once the invoice is paid
        conn.exec_driver_sql("UPDATE stripe_invoice SET status = 'paid', amount_remaining = 0, "
                             "amount_paid = amount_due WHERE stripe_customer_id IN "
                             "(SELECT stripe_customer_id FROM subs_customer WHERE account_id = %(a)s)", {"a": account})

    with freeze_time(boundary - SKEW):
        result = recompute_on_a_host(celery_app, account)

    assert result["outcome"] == "changed", result
    row = dunning_row(engine, account)
    assert (row["status"], row["level"]) == ("current", "none")
    # The decision's time never goes back either.
    assert row["changed_at"] >= boundary + SKEW


def test_a_sweep_host_behind_sees_no_drift_from_the_skew_alone(client, accounts, engine, runtime, celery_app):
    _, boundary, _, _ = escalated_by_a_host_ahead(client, accounts, engine, runtime, celery_app)

    sweeper = Sweeper(engine, runtime.policy, None, dry_run=True, clock=lambda: boundary - SKEW)
    report = sweeper.start()

    assert report.scanned >= 1
    assert report.drifted == 0, report.drifted_accounts


def test_a_decision_made_by_a_clock_far_ahead_is_undone_by_the_hosts_clock(
        client, accounts, engine, runtime, celery_app):
    """A host whose clock was set hours ahead (not skew: a broken clock) escalated the account. The
    other hosts do not follow it into its future: the next recompute decides at its own clock and
    eases the level back, as before the skew rule."""
    account, unpaid_since = unpaid_since_days_ago(client, engine, runtime, accounts, 6, "insufficient_funds")
    boundary = unpaid_since + timedelta(days=7)
    with freeze_time(boundary + timedelta(hours=3)):  # the broken host
        recompute_on_a_host(celery_app, account)
    assert stored_state(engine, account) == ("past_due", "restrict_premium")

    with freeze_time(boundary - timedelta(hours=1)):  # the others: hours behind it, no skew
        assert recompute_on_a_host(celery_app, account)["outcome"] == "changed"
    assert stored_state(engine, account) == ("past_due", "notice")


def test_billing_history_on_a_host_behind_labels_as_the_stored_decision_decided(client, accounts, engine, runtime):
    """An invoice sent for payment is past due from its due date. Host A decided a second past it (the
    account in dunning); GET /accounts/<id>/billing-history on a web host 4 minutes behind A labels the
    invoice Past due as well, not Open beside a dunning state that says past due."""
    account, customer = accounts.create()
    invoice, due = unique("in"), int(time.time()) - 3600
    sent = event("invoice.finalized", id=invoice, customer=customer, created=due - 30 * 86400, amount_due=5000,
                 amount_remaining=5000, amount_paid=0, paths={"created": due - 30 * 86400})
    sent["data"]["object"].update(collection_method="send_invoice", due_date=due)
    decided_at = datetime.fromtimestamp(due, UTC) + SKEW
    with freeze_time(decided_at):  # A is the first to decide (a worker running the webhook's recompute too)
        assert post_event(client, with_product(sent, "prod_core", 5000)).status_code == 200
        run_recompute(engine, runtime.policy, account, "STATE_REFRESH")
    assert stored_state(engine, account)[0] == "past_due" and dunning_row(engine, account)["changed_at"] == decided_at

    with freeze_time(decided_at - timedelta(minutes=4)):
        body = client.get(f"/accounts/{account}/billing-history", headers=service_headers()).json

    assert [(i["id"], i["label"]) for i in body["invoices"]] == [(invoice, "Past due")], body
