"""A subscription being cancelled for bad debt is not asked to revert its upgrade too: the
cancellation supersedes the revert (Account Management would get a revert of a subscription it is
cancelling, and may refuse it, blocking the account's outbox rows)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given

from app.domain.compute import compute
from app.domain.events import derive_events
from app.domain.snapshot import BadDebtPayment, Subscription
from app.domain.state import Status
from tests.unit.builders import NOW, TWO_SUBSCRIPTIONS, attempt, days, invoice, policy, snapshot
from tests.unit.test_compute_multi_invoice_properties import SETTINGS, accounts

POLICY = policy()


def regular_in_bad_debt(sub: str = "sub_1"):
    """in_1 of ``sub``, failed on an expired card 40 days ago: bad debt (suspended)."""
    return replace(invoice("in_1", failed_days_ago=40, attempt_count=8, sub=sub), created=days(41)), attempt(
        "pi_1", "in_1", days_ago=40, decline="expired_card")


def upgrade_run_out(sub: str = "sub_1"):
    """in_up, the upgrade of ``sub``, unpaid 30 days and marked uncollectible: its revert is due."""
    return invoice("in_up", status="uncollectible", failed_days_ago=30, billing_reason="subscription_update",
                   product="prod_premium_analytics", sub=sub), attempt("pi_up", "in_up", days_ago=30)


SUBS = (Subscription("sub_1", "active", ("prod_core", "prod_premium_analytics")),)


def after(decision, *invoices, **kw):
    """The snapshot of ``invoices`` with ``decision`` stored (its bad-debt episode open, if any)."""
    snap = snapshot(*invoices, subscriptions=SUBS, **kw)
    entered = days(0.5) if decision.state.status in (Status.BAD_DEBT, Status.LIFTING) else None
    return replace(snap, stored=decision.state, open_episode_entered_at=entered)


def rules(decision) -> list[str]:
    return [r.rule for r in decision.reasons]


def test_the_cancellation_of_a_subscription_supersedes_reverting_its_upgrade():
    regular, failed = regular_in_bad_debt()
    upgrade, upgrade_failed = upgrade_run_out()
    decision = compute(snapshot(regular, upgrade, attempts=(failed, upgrade_failed), subscriptions=SUBS), POLICY, NOW)
    assert decision.state.status == Status.BAD_DEBT
    assert decision.state.actions_requested == ("cancel:sub_1",)
    assert "upgrade.revert" not in rules(decision) and "upgrade.revert_superseded" in rules(decision)
    names = [e.name for e in derive_events(None, decision, NOW)]
    assert "CancellationRequested" in names and "UpgradeRevertRequested" not in names


def test_the_upgrade_of_another_subscription_is_still_reverted():
    regular, failed = regular_in_bad_debt()
    upgrade, upgrade_failed = upgrade_run_out(sub="sub_2")
    decision = compute(snapshot(regular, upgrade, attempts=(failed, upgrade_failed),
                                subscriptions=TWO_SUBSCRIPTIONS), POLICY, NOW)
    assert decision.state.actions_requested == ("cancel:sub_1", "revert:in_up")


def test_a_revert_requested_before_the_cancellation_is_taken_away_by_it():
    """The upgrade ran out first (its revert requested, maybe still waiting in the outbox), the
    regular invoice goes bad debt later: the revert is no longer requested (the relay then supersedes
    a row still waiting), and only the cancellation is emitted."""
    upgrade, upgrade_failed = upgrade_run_out()
    regular, failed = regular_in_bad_debt()
    before = compute(snapshot(upgrade, attempts=(upgrade_failed,), subscriptions=SUBS), POLICY, NOW)
    assert before.state.actions_requested == ("revert:in_up",)
    later = compute(after(before, regular, upgrade, attempts=(failed, upgrade_failed)), POLICY, NOW)
    assert later.state.actions_requested == ("cancel:sub_1",)
    names = [e.name for e in derive_events(before.state, later, NOW)]
    assert "CancellationRequested" in names and "UpgradeRevertRequested" not in names


def test_a_bad_debt_payment_in_flight_asks_for_neither_and_its_failure_for_the_cancellation_only():
    """/pay-bad-debt charges every unpaid invoice, the upgrade's too: while it is in flight nothing is
    cancelled or reverted; declined, the subscription is cancelled, and its upgrade still not reverted."""
    regular, failed = regular_in_bad_debt()
    upgrade, upgrade_failed = upgrade_run_out()
    in_bad_debt = compute(snapshot(regular, upgrade, attempts=(failed, upgrade_failed), subscriptions=SUBS),
                          POLICY, NOW)
    pending = BadDebtPayment(id=1, state="pending", amount=7500, created_at=days(0.01), updated_at=days(0.01),
                             failure_reason=None, stripe_payment_intent_id="pi_bd", invoice_ids=("in_1", "in_up"))
    lifting = compute(after(in_bad_debt, regular, upgrade, attempts=(failed, upgrade_failed),
                             bad_debt_payments=(pending,)), POLICY, NOW)
    assert lifting.state.status == Status.LIFTING and lifting.state.actions_requested == ()
    declined = replace(pending, state="failed", failure_reason="declined: insufficient_funds")
    again = compute(after(lifting, regular, upgrade, attempts=(failed, upgrade_failed),
                           bad_debt_payments=(declined,)), POLICY, NOW)
    assert again.state.status == Status.BAD_DEBT and again.state.actions_requested == ("cancel:sub_1",)


def test_the_revert_comes_back_when_the_bad_debt_ends_without_the_upgrade_paid():
    """The regular invoice voided (the subscription not cancelled): nothing supersedes the revert of
    the upgrade still unpaid, and it is requested."""
    regular, failed = regular_in_bad_debt()
    upgrade, upgrade_failed = upgrade_run_out()
    in_bad_debt = compute(snapshot(regular, upgrade, attempts=(failed, upgrade_failed), subscriptions=SUBS),
                          POLICY, NOW)
    voided = replace(regular, status="void", amount_remaining=0)
    ended = compute(after(in_bad_debt, voided, upgrade, attempts=(failed, upgrade_failed)), POLICY, NOW)
    assert ended.state.status == Status.PAST_DUE and ended.state.actions_requested == ("revert:in_up",)
    assert "UpgradeRevertRequested" in [e.name for e in derive_events(in_bad_debt.state, ended, NOW)]


@SETTINGS
@given(account=accounts())
def test_no_decision_asks_to_cancel_a_subscription_and_revert_its_upgrade(account):
    """Over accounts with a renewal, an upgrade (of the renewal's own subscription, or another) and
    other invoices: a subscription cancelled has none of its upgrades reverted."""
    decision = compute(account.snapshot, POLICY, NOW)
    cancelled = {a.partition(":")[2] for a in decision.state.actions_requested if a.startswith("cancel:")}
    subscription_of = {i.id: i.subscription_id for i in account.snapshot.invoices}
    reverted = [a.partition(":")[2] for a in decision.state.actions_requested if a.startswith("revert:")]
    assert not [i for i in reverted if subscription_of[i] in cancelled], decision.state.actions_requested
