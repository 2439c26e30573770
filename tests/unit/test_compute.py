"""Table-driven tests of compute(snapshot, policy, now): every rule, every failure class."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from itertools import pairwise
from typing import Any

import pytest

from app.domain.attempts import attempts_by_invoice
from app.domain.compute import compute
from app.domain.events import derive_events
from app.domain.snapshot import BadDebtPayment, Charge, CustomerDefault, Subscription
from app.domain.state import FailureClass, Level, Status, iso
from tests.unit.builders import (
    NOW,
    TWO_SUBSCRIPTIONS,
    attempt,
    days,
    declined_bad_debt_payment,
    invoice,
    method,
    policy,
    retry,
    snapshot,
    two_invoices_in_bad_debt,
)

POLICY = policy()


def rules(decision) -> list[str]:
    return [r.rule for r in decision.reasons]


def decide(snap, now=NOW, pol=POLICY):
    return compute(snap, pol, now)


# --- levels: first matching rule from the most severe down -------------------------------------

def exhausted_transient(inv_id: str, days_unpaid: float) -> tuple:
    """An invoice whose six scheduled transient retries were all used."""
    return tuple(retry(inv_id, n, days_ago=days_unpaid - d) for n, d in enumerate((1, 3, 5, 7, 10, 14), 1))


@pytest.mark.parametrize(
    ("days_unpaid", "decline", "retries_exhausted", "level", "status"),
    [
        (0.5, "insufficient_funds", False, Level.NOTICE, Status.PAST_DUE),
        (2.5, "expired_card", False, Level.NOTICE, Status.PAST_DUE),  # permanent, < 3 days
        (3.0, "expired_card", False, Level.RESTRICT_PREMIUM, Status.PAST_DUE),  # permanent >= 3 days
        (4.0, "authentication_required", False, Level.RESTRICT_PREMIUM, Status.PAST_DUE),  # action_required
        (5.0, "insufficient_funds", False, Level.NOTICE, Status.PAST_DUE),  # transient 3..7 days: still notice
        (7.0, "insufficient_funds", False, Level.RESTRICT_PREMIUM, Status.PAST_DUE),
        (8.0, "a_new_stripe_code", False, Level.RESTRICT_PREMIUM, Status.PAST_DUE),  # unknown class
        (14.0, "insufficient_funds", False, Level.LIMITED, Status.PAST_DUE),
        (21.0, "insufficient_funds", False, Level.LIMITED, Status.PAST_DUE),  # retries left: not yet bad debt
        (21.0, "insufficient_funds", True, Level.SUSPENDED, Status.BAD_DEBT),
        (21.0, "expired_card", False, Level.SUSPENDED, Status.BAD_DEBT),  # permanent: nothing to retry
    ],
)
def test_level_rules(days_unpaid, decline, retries_exhausted, level, status):
    inv = invoice(failed_days_ago=days_unpaid)
    retries = exhausted_transient("in_1", days_unpaid) if retries_exhausted else ()
    snap = snapshot(inv, attempts=(attempt("pi_1", "in_1", days_ago=days_unpaid, decline=decline),), retries=retries)
    decision = decide(snap)
    assert decision.state.level == level
    assert decision.state.status == status
    assert decision.bad_debt == (status == Status.BAD_DEBT)
    assert f"level.{level.value}" in rules(decision)


def test_nothing_unpaid_is_current_with_full_access():
    decision = decide(snapshot(invoice(status="paid", failed_days_ago=None)))
    state = decision.state
    assert (state.status, state.level, state.failure_class, state.next_retry_at) == ("current", "none", None, None)
    assert state.entitlements == {"products": {"prod_core": "full"}, "plan_changes": True}
    assert rules(decision) == ["status.current"]


def test_open_invoice_not_yet_attempted_is_not_debt():
    decision = decide(snapshot(invoice(failed_days_ago=None, due_date=NOW + timedelta(days=3))))
    assert decision.state.status == Status.CURRENT


def test_open_invoice_past_its_due_date_is_debt():
    decision = decide(snapshot(invoice(failed_days_ago=None, due_date=days(8))))
    assert decision.state.status == Status.PAST_DUE
    assert decision.state.level == Level.RESTRICT_PREMIUM


def test_a_late_first_failure_does_not_restart_the_clock_of_an_overdue_invoice():
    # Due 30 days ago, then the customer's first card payment fails today: unpaid for 30 days.
    overdue = replace(invoice(failed_days_ago=0.1), due_date=days(30), created=days(60))
    decision = decide(snapshot(overdue, attempts=(attempt("pi_1", "in_1", days_ago=0.1),)))
    assert decision.state.unpaid_since == days(30)
    # 30 days overdue, nothing to retry (the customer pays by invoice): bad debt, as without the
    # attempt: trying to pay never lowers it
    assert decision.state.level == Level.SUSPENDED
    assert decide(snapshot(replace(overdue, first_failed_at=None, attempt_count=0))).state.level == Level.SUSPENDED
    # sent for payment: the failure on the hosted page starts no automatic retry of the customer's card
    assert decision.state.next_retry_at is None and "retry.none_send_invoice" in rules(decision)


@pytest.mark.parametrize(
    ("days_overdue", "level", "status"),
    [
        (1, Level.NOTICE, Status.PAST_DUE),
        (8, Level.RESTRICT_PREMIUM, Status.PAST_DUE),
        (15, Level.LIMITED, Status.PAST_DUE),
        (21, Level.SUSPENDED, Status.BAD_DEBT),
        (60, Level.SUSPENDED, Status.BAD_DEBT),
    ],
)
def test_an_overdue_invoice_never_attempted_plans_no_retry_and_escalates_with_its_age(days_overdue, level, status):
    """Sent for payment (the customer pays by invoice) and never attempted: Stripe's collection has not
    failed, nothing is retried (a retry would charge a card the customer never offered, or with none
    be refused every 6 h for ever), and the levels follow the days since the due date up to bad debt:
    nothing is left to retry, so no retry budget holds the account below it."""
    inv = replace(invoice(failed_days_ago=None, due_date=days(days_overdue)), created=days(days_overdue + 30))
    decision = decide(snapshot(inv, payment_methods=(method("pm_1", changed_days_ago=90),),
                               default_payment_method_id="pm_1", default_payment_method_changed_at=days(90)))
    [assessment] = decision.assessments
    assert decision.state.next_retry_at is None and assessment.retry_method is None
    assert "retry.scheduled" not in rules(decision) and "retry.none_send_invoice" in rules(decision)
    [why] = [r for r in decision.reasons if r.rule == "retry.none_send_invoice"]
    assert why.facts == {"invoice": "in_1", "due_date": iso(days(days_overdue)), "failed": False}
    assert assessment.exhausted
    assert (decision.state.level, decision.state.status) == (level, status)


def test_an_unpaid_invoice_with_no_failed_attempt_is_never_retried():
    """Debt without any failure (marked uncollectible aside, only an invoice with a due date is):
    even a card added since earns no free retry, as there is no failed collection to retry."""
    inv = replace(invoice(failed_days_ago=None, due_date=days(10)), created=days(40))
    decision = decide(snapshot(inv, payment_methods=(method("pm_2", changed_days_ago=1),)))
    assert decision.state.next_retry_at is None
    assert "retry.new_method" not in rules(decision)


def test_marked_uncollectible_is_bad_debt_and_requests_cancellation():
    inv = invoice(status="uncollectible", failed_days_ago=2)
    decision = decide(snapshot(inv))
    assert decision.state.status == Status.BAD_DEBT and decision.state.level == Level.SUSPENDED
    assert decision.bad_debt_reason == "marked_uncollectible"
    assert decision.bad_debt_products == ("prod_core",)
    assert decision.state.actions_requested == ("cancel:sub_1",)
    assert decision.state.entitlements["products"] == {"prod_core": "revoked"}


def test_an_uncollectible_invoice_is_never_retried_automatically():
    """Written off, it is collected only by the bad-debt payment: Stripe would pay it if asked, so a
    retry due by the schedule (a transient decline two days ago) is not planned."""
    failed = attempt("pi_1", "in_1", days_ago=2, decline="insufficient_funds")
    open_decision = decide(snapshot(invoice(failed_days_ago=2), attempts=(failed,)))
    assert open_decision.state.next_retry_at is not None  # the same invoice, open, is retried
    decision = decide(snapshot(invoice(status="uncollectible", failed_days_ago=2), attempts=(failed,)))
    assert decision.state.next_retry_at is None and decision.state.retry_invoice_id is None
    assert "retry.none_uncollectible" in [r.rule for r in decision.state.reasons]


def test_cancellation_is_not_requested_for_a_subscription_already_canceled():
    inv = invoice(status="uncollectible", failed_days_ago=2)
    decision = decide(snapshot(inv, subscriptions=(Subscription("sub_1", "canceled", ("prod_core",)),)))
    assert decision.state.status == Status.BAD_DEBT
    assert decision.state.actions_requested == ()


@pytest.mark.parametrize("status", ["canceled", "incomplete_expired"])
@pytest.mark.parametrize("days_unpaid", [1, 8, 15])
def test_a_subscription_ended_while_its_invoice_is_unpaid_grants_nothing(status, days_unpaid):
    """The customer canceled mid-dunning (Stripe voids nothing on a cancel: the invoice is still owed).
    Entitlements are the full desired set Account Management applies: the ended subscription's
    product must not come back in full (notice) or read-only (limited) because its invoice is unpaid.
    A product an active subscription also carries keeps that one's access under the level."""
    subs = (Subscription("sub_1", status, ("prod_core", "prod_shared")),
            Subscription("sub_2", "active", ("prod_other", "prod_shared")))
    inv = replace(invoice(failed_days_ago=days_unpaid),
                  lines=invoice().lines + invoice(product="prod_shared").lines)
    decision = decide(snapshot(inv, subscriptions=subs,
                               attempts=(attempt("pi_1", "in_1", days_ago=days_unpaid),)))
    level = Level(decision.state.level)
    shared = {Level.NOTICE: "full", Level.RESTRICT_PREMIUM: "full", Level.LIMITED: "read_only"}[level]
    assert decision.state.entitlements["products"] == {"prod_core": "revoked", "prod_other": "full",
                                                       "prod_shared": shared}
    # Paid, the ended subscription's product is no product of the account at all.
    paid = decide(snapshot(replace(inv, status="paid", amount_paid=5000, amount_remaining=0, paid_at=NOW),
                           subscriptions=subs))
    assert "prod_core" not in paid.state.entitlements["products"]


def test_expired_card_last_week_and_six_months_unpaid_are_treated_differently():
    last_week = decide(snapshot(invoice(failed_days_ago=7),
                                attempts=(attempt("pi_1", "in_1", days_ago=7, decline="expired_card"),)))
    six_months = decide(snapshot(invoice(failed_days_ago=182),
                                 attempts=(attempt("pi_1", "in_1", days_ago=182, decline="insufficient_funds"),),
                                 retries=exhausted_transient("in_1", 182)))
    assert last_week.state.level == Level.RESTRICT_PREMIUM and last_week.state.status == Status.PAST_DUE
    assert six_months.state.level == Level.SUSPENDED and six_months.state.status == Status.BAD_DEBT
    assert last_week.state.entitlements != six_months.state.entitlements


def test_small_balance_caps_at_notice():
    inv = invoice(status="uncollectible", failed_days_ago=40, amount=300)
    decision = decide(snapshot(inv))
    assert decision.state.level == Level.NOTICE and decision.state.status == Status.PAST_DUE
    assert "balance.small" in rules(decision)


def test_small_balances_in_two_currencies_do_not_add_up():
    """An account of two Stripe customers billed in two currencies: 300 cents and 300 euro cents are
    two small balances, not one of 600 (each is compared with the threshold in its own currency)."""
    usd = invoice("in_usd", status="uncollectible", failed_days_ago=40, amount=300, currency="usd")
    eur = invoice("in_eur", status="uncollectible", failed_days_ago=40, amount=300, currency="eur", sub="sub_2")
    decision = decide(snapshot(usd, eur, subscriptions=TWO_SUBSCRIPTIONS))
    assert decision.state.level == Level.NOTICE and decision.state.status == Status.PAST_DUE
    # each says which invoice and whose currency's balance it is (two reasons of 300 say nothing else)
    assert [(r.facts["invoice"], r.facts["balance"], r.facts["currency"])
            for r in decision.reasons if r.rule == "balance.small"] == [("in_eur", 300, "eur"), ("in_usd", 300, "usd")]
    # The same 600 in one currency is no small balance.
    one = decide(snapshot(usd, replace(eur, currency="usd"), subscriptions=TWO_SUBSCRIPTIONS))
    assert one.state.status == Status.BAD_DEBT and "balance.small" not in rules(one)


# --- scoping to products, upgrades ------------------------------------------------------------

def test_consequences_touch_only_the_products_of_unpaid_invoices():
    subs = (Subscription("sub_1", "active", ("prod_core",)), Subscription("sub_annual", "active", ("prod_premium",)))
    annual_paid = invoice("in_annual", status="paid", failed_days_ago=None, product="prod_premium", sub="sub_annual")
    unpaid_core = invoice("in_core", failed_days_ago=15, product="prod_core")
    decision = decide(snapshot(annual_paid, unpaid_core, subscriptions=subs,
                               attempts=(attempt("pi_1", "in_core", days_ago=15),)))
    assert decision.state.level == Level.LIMITED
    assert decision.state.entitlements == {
        "products": {"prod_core": "read_only", "prod_premium": "full"},  # the paid annual product is untouched
        "plan_changes": False,
    }


@pytest.mark.parametrize(
    ("level_days", "core", "premium"),
    [(1, "full", "full"), (8, "full", "revoked"), (15, "read_only", "revoked")],
)
def test_premium_goes_first_core_is_kept_longest(level_days, core, premium):
    subs = (Subscription("sub_1", "active", ("prod_core", "prod_premium")),)
    inv = replace(invoice(failed_days_ago=level_days), lines=invoice().lines + (invoice(product="prod_premium").lines))
    decision = decide(snapshot(inv, subscriptions=subs, attempts=(attempt("pi_1", "in_1", days_ago=level_days),)))
    assert decision.state.entitlements["products"] == {"prod_core": core, "prod_premium": premium}


def test_unpaid_upgrade_withholds_only_the_upgrade_and_never_becomes_bad_debt():
    subs = (Subscription("sub_1", "active", ("prod_core", "prod_premium_analytics")),)
    regular_paid = invoice("in_cycle", status="paid", failed_days_ago=None)
    upgrade = invoice("in_up", failed_days_ago=60, product="prod_premium_analytics",
                      billing_reason="subscription_update")
    decision = decide(snapshot(regular_paid, upgrade, subscriptions=subs,
                               attempts=(attempt("pi_up", "in_up", days_ago=60),),
                               retries=exhausted_transient("in_up", 60)))
    state = decision.state
    assert state.status == Status.PAST_DUE and not decision.bad_debt
    assert state.level == Level.RESTRICT_PREMIUM  # capped by upgrade_max_level
    assert state.entitlements["products"] == {"prod_core": "full", "prod_premium_analytics": "withheld"}
    assert state.entitlements["plan_changes"] is True
    assert state.actions_requested == ("revert:in_up",)  # revert the upgrade, never cancel
    assert {"upgrade.capped", "upgrade.revert"} <= set(rules(decision))


def test_uncollectible_upgrade_is_reverted_not_bad_debt():
    upgrade = invoice("in_up", status="uncollectible", failed_days_ago=30, billing_reason="subscription_update")
    decision = decide(snapshot(upgrade))
    assert decision.state.status == Status.PAST_DUE and decision.state.actions_requested == ("revert:in_up",)


@pytest.mark.parametrize("status", ["canceled", "incomplete_expired"])
def test_the_upgrade_of_a_subscription_that_ended_is_not_reverted(status):
    """The customer canceled the subscription while its upgrade was unpaid: once the upgrade's dunning
    runs out, no revert goes to the lifecycle workflow for a subscription that no longer exists (as no
    cancellation does); the upgrade stays capped below bad debt."""
    upgrade = invoice("in_up", status="uncollectible", failed_days_ago=30, billing_reason="subscription_update")
    ended = decide(snapshot(upgrade, subscriptions=(Subscription("sub_1", status, ("prod_core",)),)))
    assert ended.state.status == Status.PAST_DUE and ended.state.actions_requested == ()
    assert "upgrade.revert" not in rules(ended)
    assert not [e for e in derive_events(None, ended, NOW) if e.name == "UpgradeRevertRequested"]
    # Still active (or a subscription the snapshot does not know): reverted.
    for subs in ((Subscription("sub_1", "active", ("prod_core",)),), ()):
        assert decide(snapshot(upgrade, subscriptions=subs)).state.actions_requested == ("revert:in_up",)


@pytest.mark.parametrize(("days_unpaid", "reverted"), [(1 / 24, False), (5, False), (20.9, False), (21, True)])
def test_an_upgrade_needing_3ds_is_reverted_only_when_its_dunning_has_run_out(days_unpaid, reverted):
    # No retry is planned for action_required on day 0 (the customer is asked to authenticate), which
    # is not the end of the upgrade's dunning: it runs out when a regular invoice would be bad debt.
    upgrade = invoice("in_up", failed_days_ago=days_unpaid, billing_reason="subscription_update")
    needs_3ds = attempt("pi_up", "in_up", days_ago=days_unpaid, decline="authentication_required")
    decision = decide(snapshot(upgrade, attempts=(needs_3ds,)))
    assert decision.state.actions_requested == (("revert:in_up",) if reverted else ())
    assert decision.state.status == Status.PAST_DUE and not decision.bad_debt


def test_a_payment_in_flight_holds_an_upgrades_revert():
    upgrade = invoice("in_up", failed_days_ago=30, billing_reason="subscription_update")
    failed = attempt("pi_up", "in_up", days_ago=30, decline="expired_card")
    paying = attempt("pi_new", "in_up", days_ago=5 / 1440, status="succeeded", pm="pm_2")  # invoice.paid not in
    decision = decide(snapshot(upgrade, attempts=(failed, paying)))
    assert decision.state.actions_requested == () and "guard.revert_held" in rules(decision)
    assert decide(snapshot(upgrade, attempts=(failed, paying)), now=NOW + timedelta(minutes=26)
                  ).state.actions_requested == ("revert:in_up",)


# --- retry cadence by class -------------------------------------------------------------------

@pytest.mark.parametrize(
    ("decline", "retries_used", "expected_day"),
    [
        ("insufficient_funds", 0, 1),
        ("insufficient_funds", 2, 5),
        ("insufficient_funds", 5, 14),
        ("processing_error", 3, 7),
        ("brand_new_code", 0, 2),  # unknown: smaller budget, days 2, 5, 9
        ("brand_new_code", 2, 9),
    ],
)
def test_transient_and_unknown_failures_follow_their_schedule(decline, retries_used, expected_day):
    inv = invoice(failed_days_ago=0.5)
    used = tuple(retry("in_1", n, days_ago=0.4) for n in range(1, retries_used + 1))
    # the first attempt, then one attempt per retry
    attempts = tuple(attempt(f"pi_{n}", "in_1", days_ago=0.5 - n / 100, decline=decline)
                     for n in range(retries_used + 1))
    decision = decide(snapshot(inv, attempts=attempts, retries=used))
    assert decision.state.next_retry_at == days(0.5) + timedelta(days=expected_day)
    assert decision.state.retries_used == retries_used
    assert decision.state.retry_free is False


def test_unknown_schedule_runs_out_sooner_than_transient():
    for decline, budget in (("insufficient_funds", 6), ("brand_new_code", 3)):
        inv = invoice(failed_days_ago=30)
        used = tuple(retry("in_1", n, days_ago=29) for n in range(1, budget + 1))
        decision = decide(snapshot(inv, attempts=(attempt("pi_1", "in_1", days_ago=28, decline=decline),),
                                   retries=used))
        assert decision.state.next_retry_at is None
        assert "retry.schedule_done" in rules(decision)


@pytest.mark.parametrize("decline", ["expired_card", "stolen_card", "authentication_required", "incorrect_cvc"])
def test_permanent_and_action_required_are_not_retried_on_the_same_method(decline):
    decision = decide(snapshot(invoice(failed_days_ago=2), attempts=(attempt("pi_1", "in_1", days_ago=2,
                                                                             decline=decline),)))
    assert decision.state.next_retry_at is None
    cls = FailureClass.PERMANENT if decline in ("expired_card", "stolen_card") else FailureClass.ACTION_REQUIRED
    assert decision.state.failure_class == cls
    assert f"retry.none_{cls.value}" in rules(decision)


def test_new_payment_method_earns_one_immediate_free_retry():
    failed = attempt("pi_1", "in_1", days_ago=2, decline="expired_card", pm="pm_old")
    new_card = method("pm_new", changed_days_ago=0.5)
    decision = decide(snapshot(invoice(failed_days_ago=2), attempts=(failed,), payment_methods=(new_card,)))
    state = decision.state
    assert state.next_retry_at == new_card.changed_at  # due now: beat dispatches it on its next tick
    assert (state.retry_free, state.retry_payment_method_id, state.retry_invoice_id) == (True, "pm_new", "in_1")
    assert "retry.new_method" in rules(decision)

    # once the free retry was made on it, it is not offered again
    used = retry("in_1", 1, days_ago=0.4, free=True, pm="pm_new")
    after = attempt("pi_2", "in_1", days_ago=0.3, decline="expired_card", pm="pm_new")
    decision = decide(snapshot(invoice(failed_days_ago=2), attempts=(failed, after), payment_methods=(new_card,),
                               retries=(used,)))
    assert decision.state.next_retry_at is None
    assert decision.state.retries_used == 0  # the free retry does not count against the budget


def test_a_new_default_method_also_earns_the_free_retry():
    failed = attempt("pi_1", "in_1", days_ago=2, decline="expired_card", pm="pm_old")
    existing = method("pm_other", changed_days_ago=30)
    decision = decide(snapshot(invoice(failed_days_ago=2), attempts=(failed,), payment_methods=(existing,),
                               default_payment_method_id="pm_other", default_payment_method_changed_at=days(0.2)))
    assert decision.state.retry_free and decision.state.retry_payment_method_id == "pm_other"


def test_a_retry_uses_only_a_method_of_the_invoices_own_customer():
    # Two Stripe customers on one account: Stripe pays cus_1's invoice only with a method of cus_1,
    # however new cus_2's card (and its default) is.
    failed = attempt("pi_1", "in_1", days_ago=2, decline="try_again_later", pm="pm_1")
    own = method("pm_1", changed_days_ago=30, stripe_customer_id="cus_1")
    other = method("pm_2", changed_days_ago=0.5, stripe_customer_id="cus_2")
    defaults = (CustomerDefault("cus_2", "pm_2", days(0.5)), CustomerDefault("cus_1", "pm_1", days(30)))
    snap = snapshot(invoice(failed_days_ago=2, stripe_customer_id="cus_1"), attempts=(failed,),
                    payment_methods=(own, other), default_payment_method_id="pm_2",
                    default_payment_method_changed_at=days(0.5), customer_defaults=defaults)
    decision = decide(snap)
    assert "retry.new_method" not in rules(decision) and "retry.scheduled" in rules(decision)
    assert (decision.state.retry_invoice_id, decision.state.retry_payment_method_id) == ("in_1", "pm_1")
    assert not decision.state.retry_free

    # cus_2's own invoice does get the free retry on cus_2's new card
    failed_2 = attempt("pi_2", "in_2", days_ago=2, decline="try_again_later", pm="pm_old")
    snap = replace(snap, invoices=(invoice("in_2", failed_days_ago=2, stripe_customer_id="cus_2"),),
                   attempts=(failed_2,))
    decision = decide(snap)
    assert "retry.new_method" in rules(decision)
    assert (decision.state.retry_invoice_id, decision.state.retry_payment_method_id) == ("in_2", "pm_2")


def test_the_failed_method_made_default_again_earns_no_retry():
    # A permanent decline is not retried on the same card, whatever touched the customer afterwards.
    failed = attempt("pi_1", "in_1", days_ago=2, decline="stolen_card", pm="pm_1")
    same_card = method("pm_1", changed_days_ago=100)
    decision = decide(snapshot(invoice(failed_days_ago=2), attempts=(failed,), payment_methods=(same_card,),
                               default_payment_method_id="pm_1", default_payment_method_changed_at=days(1.99)))
    assert decision.state.next_retry_at is None and "retry.none_permanent" in rules(decision)


def test_per_invoice_cap_of_8_attempts_whatever_the_policy():
    generous = policy(max_attempts_per_invoice=50, transient_schedule_days=(1, 2, 3, 4, 5, 6, 7))
    attempts = tuple(attempt(f"pi_{i}", "in_1", days_ago=10 - i) for i in range(8))
    decision = decide(snapshot(invoice(failed_days_ago=10), attempts=attempts), pol=generous)
    assert decision.state.next_retry_at is None
    assert "retry.cap_invoice" in rules(decision)


def test_per_method_cap_of_15_in_30_days_defers_the_retry():
    # 15 attempts on pm_1 over the last 20 days across other invoices, then this invoice fails.
    others = tuple(attempt(f"pi_o{i}", f"in_o{i}", days_ago=20 - i, status="failed") for i in range(14))
    mine = attempt("pi_me", "in_1", days_ago=1)
    decision = decide(snapshot(invoice(failed_days_ago=1), attempts=(*others, mine)))
    oldest = min(a.attempted_at for a in (*others, mine))
    assert decision.state.next_retry_at == oldest + timedelta(days=30)
    assert "retry.cap_method_30d" in rules(decision)


def test_per_method_cap_counts_every_charge_on_a_reused_intent():
    # Three invoices retried on pm_1, five or six charges each on its own (reused) payment intent:
    # 17 charges in 20 days, three mirror rows. A fourth invoice's retry on pm_1 waits.
    reused = tuple(
        attempt(f"pi_{n}", f"in_{n}", days_ago=20 - 6 * n,
                charges=tuple(Charge(f"ch_{n}_{k}", "pm_1", days(20 - 6 * n - k)) for k in range(6 - (n == 2))))
        for n in range(3))
    mine = attempt("pi_me", "in_1", days_ago=1)
    decision = decide(snapshot(invoice(failed_days_ago=1), attempts=(*reused, mine)))
    assert "retry.cap_method_30d" in rules(decision)
    # the oldest charges leave the 30 days first: the 15th most recent of 18 frees the window
    times = sorted([c.charged_at for a in reused for c in a.charges] + [mine.attempted_at])
    assert decision.state.next_retry_at == times[len(times) - 15] + timedelta(days=30)


def test_per_method_cap_counts_a_reused_intents_charges_by_their_own_method():
    # The same intent charged 14 times on pm_old, then on pm_1: pm_1 has had two charges, not 16.
    charges = (*(Charge(f"ch_{k}", "pm_old", days(20 - k)) for k in range(14)), Charge("ch_new", None, days(2)))
    reused = attempt("pi_1", "in_2", days_ago=2, pm="pm_1", charges=charges)
    mine = attempt("pi_me", "in_1", days_ago=1)
    decision = decide(snapshot(invoice(failed_days_ago=1), attempts=(reused, mine)))
    assert "retry.cap_method_30d" not in rules(decision) and decision.state.next_retry_at is not None


def test_a_retry_stripe_refused_spends_no_budget_and_the_next_one_waits():
    # A revoked API key: Stripe turned the day-1 retry down before charging.
    refused = retry("in_1", 1, days_ago=1.5, state="refused")
    first_failure = attempt("pi_1", "in_1", days_ago=2)
    decision = decide(snapshot(invoice(failed_days_ago=2), attempts=(first_failure,), retries=(refused,)))
    assert decision.state.retries_used == 0
    assert decision.state.next_retry_at == days(2) + timedelta(days=1)  # still day 1's: 6 hours are past
    soon = retry("in_1", 1, days_ago=0.1, state="refused")
    decision = decide(snapshot(invoice(failed_days_ago=2), attempts=(first_failure,), retries=(soon,)))
    assert decision.state.next_retry_at == soon.created_at + timedelta(hours=6)
    assert "retry.refused_backoff" in rules(decision)


def test_a_free_retry_skipped_unsent_is_offered_again():
    failed = attempt("pi_1", "in_1", days_ago=2, decline="expired_card", pm="pm_old")
    new_card = method("pm_new", changed_days_ago=0.5)
    skipped = retry("in_1", 1, days_ago=0.4, free=True, pm="pm_new", state="skipped")  # never reached Stripe
    decision = decide(snapshot(invoice(failed_days_ago=2), attempts=(failed,), payment_methods=(new_card,),
                               retries=(skipped,)))
    assert decision.state.retry_free and decision.state.retry_payment_method_id == "pm_new"
    assert decision.state.next_retry_at is not None


def test_the_method_cap_counts_a_retry_sent_whose_attempt_is_not_mirrored_yet():
    # 14 attempts on pm_1 mirrored, and another invoice's retry sent on pm_1 a minute ago: that is 15.
    others = tuple(attempt(f"pi_o{i}", f"in_o{i}", days_ago=20 - i) for i in range(13))
    mine = attempt("pi_me", "in_1", days_ago=1)
    sent = retry("in_o99", 1, days_ago=1 / 1440, state="sent", pm="pm_1")
    decision = decide(snapshot(invoice(failed_days_ago=1), attempts=(*others, mine), retries=(sent,)))
    assert "retry.cap_method_30d" in rules(decision)
    assert decision.state.next_retry_at == min(a.attempted_at for a in others) + timedelta(days=30)


def test_no_retry_is_planned_over_a_stripe_attempt_still_processing():
    inv = invoice(failed_days_ago=3)
    first = attempt("pi_1", "in_1", days_ago=3)
    debit = attempt("pi_2", "in_1", days_ago=2 / 24, status="processing")  # a bank debit, two hours in
    decision = decide(snapshot(inv, attempts=(first, debit)))
    assert decision.state.next_retry_at is None and "retry.in_flight" in rules(decision)
    # Waiting for the customer (3-D Secure) holds for the guard window only.
    challenge = attempt("pi_3", "in_1", days_ago=5 / 1440, status="requires_action")
    assert decide(snapshot(inv, attempts=(first, challenge))).state.next_retry_at is None
    later = decide(snapshot(inv, attempts=(first, challenge)), now=NOW + timedelta(minutes=26))
    assert later.state.next_retry_at is not None
    # no event may come when the hold ends: the decision says when to look again
    held = decide(snapshot(inv, attempts=(first, challenge)))
    assert held.state.next_review_at == challenge.attempted_at + timedelta(minutes=30)


def test_a_payment_in_flight_never_lifts_bad_debt_before_any_money_arrives():
    """Holding retries over an attempt in flight must not make the invoice's dunning 'not run out':
    an account in bad debt would leave it (BadDebtExited, entitlements eased) on a debit that may
    fail, and enter it again afterwards with a second cancellation."""
    base = _suspended_snapshot()
    in_bad_debt = compute(base, POLICY, NOW).state
    assert in_bad_debt.status == Status.BAD_DEBT
    debit = attempt("pi_2", "in_1", days_ago=2 / 24, status="processing", pm="pm_2")  # two hours in
    held = decide(replace(base, stored=in_bad_debt, attempts=(*base.attempts, debit)))
    assert held.state.status == Status.BAD_DEBT and held.state.next_retry_at is None
    # paid by a bank debit through /pay-bad-debt: lifting, as with a card
    paying = BadDebtPayment(id=7, state="pending", amount=5000, created_at=days(2 / 24), updated_at=days(2 / 24))
    lifting = decide(replace(base, stored=in_bad_debt, attempts=(*base.attempts, replace(debit, invoice_id=None)),
                             bad_debt_payments=(paying,)))
    assert lifting.state.status == Status.LIFTING


def test_no_automatic_retry_is_planned_beside_a_bad_debt_payment_in_flight():
    # A free retry after a new card would otherwise stay due, be dispatched and skipped every tick.
    failed = attempt("pi_1", "in_1", days_ago=2, decline="expired_card", pm="pm_old")
    paying = BadDebtPayment(id=7, state="pending", amount=5000, created_at=days(0.01), updated_at=days(0.01))
    decision = decide(snapshot(invoice(failed_days_ago=2), attempts=(failed,), payment_methods=(method("pm_new"),),
                               bad_debt_payments=(paying,)))
    assert decision.state.next_retry_at is None and "retry.held_bad_debt_payment" in rules(decision)


def test_no_automatic_retry_of_an_invoice_another_accounts_bad_debt_payment_covers_the_accounts_own_is_planned():
    """Another team moved a customer here while its old account's bad-debt payment ran: that payment
    collects the customer's invoices, so no automatic retry of them beside it (the dispatcher skips
    it, and would every tick, while the account's own invoice, retried later, waited behind it for
    the payment's outcome: days with a bank debit). The account's own invoice is retried as planned."""
    moved = invoice("in_moved", failed_days_ago=2)
    own = invoice("in_own", failed_days_ago=1.5, sub="sub_2")
    attempts = (attempt("pi_m", "in_moved", days_ago=2), attempt("pi_o", "in_own", days_ago=1.5))
    theirs = BadDebtPayment(id=9, state="pending", amount=5000, created_at=days(0.5), updated_at=days(0.5),
                            invoice_ids=("in_moved",))
    alone = decide(snapshot(moved, own, attempts=attempts, subscriptions=TWO_SUBSCRIPTIONS))
    assert alone.state.retry_invoice_id == "in_moved"  # the earlier one, without the other payment
    decision = decide(snapshot(moved, own, attempts=attempts, subscriptions=TWO_SUBSCRIPTIONS,
                               payments_elsewhere=(theirs,)))
    assert decision.state.retry_invoice_id == "in_own" and decision.state.next_retry_at is not None
    held = [r for r in decision.reasons if r.rule == "retry.held_bad_debt_payment"]
    assert [r.facts for r in held] == [{"payment": 9, "invoice": "in_moved"}]


def test_retry_in_flight_waits_for_its_outcome_until_the_guard_window():
    inv = invoice(failed_days_ago=3)
    first = attempt("pi_1", "in_1", days_ago=3)
    fresh = retry("in_1", 1, days_ago=0.005, state="sent")  # 7 minutes ago
    decision = decide(snapshot(inv, attempts=(first,), retries=(fresh,)))
    assert decision.state.next_retry_at is None and "retry.in_flight" in rules(decision)
    stale = retry("in_1", 1, days_ago=0.05, state="sent")  # 72 minutes ago, outcome never came
    decision = decide(snapshot(inv, attempts=(first,), retries=(stale,)))
    # the second scheduled retry (day 3), two days (its gap) after the first one was charged
    assert decision.state.next_retry_at == stale.created_at + timedelta(days=2)


def test_a_failure_waiting_for_3ds_is_action_required_without_a_failed_charge():
    # invoice.payment_failed and the intent waiting for its customer's authentication, no charge.
    waiting = attempt("pi_1", "in_1", days_ago=4, status="requires_action")
    decision = decide(snapshot(invoice(failed_days_ago=4), attempts=(waiting,)))
    assert decision.state.failure_class == FailureClass.ACTION_REQUIRED
    assert decision.state.next_retry_at is None and decision.state.level == Level.RESTRICT_PREMIUM


def test_failure_without_attempt_detail_is_unknown_until_it_arrives():
    decision = decide(snapshot(invoice(failed_days_ago=1)))
    assert decision.state.failure_class == FailureClass.UNKNOWN
    assert decision.state.status == Status.PAST_DUE


def test_attempt_without_invoice_link_goes_to_the_latest_earlier_invoice():
    older = invoice("in_old", status="paid", failed_days_ago=None)
    older = replace(older, created=days(40))
    current = invoice("in_new", failed_days_ago=2)
    unlinked = attempt("ch_1", None, days_ago=2, decline="expired_card")
    decision = decide(snapshot(older, current, attempts=(unlinked,)))
    assert decision.state.failure_class == FailureClass.PERMANENT
    assert decision.state.last_failure_id == f"ch_1@{days(2).isoformat()}"


def test_an_unlinked_attempt_never_goes_to_an_invoice_paid_before_it():
    failing = replace(invoice("in_a", failed_days_ago=10), created=days(11))
    paid_since = replace(invoice("in_b", status="paid", failed_days_ago=None), created=days(3), paid_at=days(3))
    first = attempt("pi_a", "in_a", days_ago=10)  # insufficient_funds
    unlinked = attempt("ch_1", None, days_ago=1, decline="expired_card", amount=5000)
    decision = decide(snapshot(failing, paid_since, attempts=(first, unlinked)))
    assert decision.state.failure_class == FailureClass.PERMANENT  # the expired card is in_a's
    assert decision.state.next_retry_at is None and "retry.none_permanent" in rules(decision)
    # Two open invoices: the one of the attempt's amount.
    other = replace(invoice("in_c", failed_days_ago=None, amount=700), created=days(2))
    decision = decide(snapshot(failing, other, attempts=(first, unlinked)))
    assert [r.facts["invoice"] for r in decision.reasons if r.rule == "retry.none_permanent"] == ["in_a"]


# --- payment-flow guard, lifting ----------------------------------------------------------------

def _suspended_snapshot(**kw):
    return snapshot(invoice(failed_days_ago=30), attempts=(attempt("pi_1", "in_1", days_ago=30),),
                    retries=exhausted_transient("in_1", 30), **kw)


def test_guard_holds_bad_debt_while_a_payment_is_in_flight():
    in_flight = retry("in_1", 7, days_ago=10 / 1440, free=True, state="charging")  # 10 minutes ago
    base = _suspended_snapshot()
    snap = replace(base, retries=(*base.retries, in_flight))
    decision = decide(snap)
    assert decision.state.status == Status.PAST_DUE and not decision.bad_debt
    assert "retry.in_flight" in rules(decision)
    # past the 30-minute window the guard lets go
    late = decide(snap, now=NOW + timedelta(minutes=21))
    assert late.state.status == Status.BAD_DEBT


def test_guard_holds_even_an_uncollectible_mark_while_a_payment_is_in_flight():
    in_flight = retry("in_1", 1, days_ago=10 / 1440, state="sent")
    snap = snapshot(invoice(status="uncollectible", failed_days_ago=5), retries=(in_flight,))
    decision = decide(snap)
    assert decision.state.status == Status.PAST_DUE
    assert "guard.payment_in_flight" in rules(decision)
    assert decide(snap, now=NOW + timedelta(minutes=21)).state.status == Status.BAD_DEBT


def test_guard_holds_bad_debt_over_a_success_whose_invoice_paid_event_has_not_arrived():
    # Stripe sends the charge's success and invoice.paid as separate events in no set order: for a
    # moment the mirror holds a succeeded attempt on an invoice that still says open.
    base = _suspended_snapshot()
    paid_now = attempt("pi_2", "in_1", days_ago=2 / 1440, status="succeeded", pm="pm_2")  # 2 minutes ago
    snap = replace(base, attempts=(*base.attempts, paid_now))
    decision = decide(snap)
    assert decision.state.status == Status.PAST_DUE and not decision.bad_debt
    assert decision.state.actions_requested == ()  # no cancellation for a customer who just paid
    assert "guard.payment_in_flight" in rules(decision)
    # a success on another, paid invoice does not hold this one's bad debt
    other = replace(base, invoices=(*base.invoices, invoice("in_2", status="paid", failed_days_ago=None)),
                    attempts=(*base.attempts, replace(paid_now, invoice_id="in_2")))
    assert decide(other).state.status == Status.BAD_DEBT
    # the window passes and invoice.paid never came: the guard lets go
    assert decide(snap, now=NOW + timedelta(minutes=29)).state.status == Status.BAD_DEBT


def test_the_guard_holds_an_invoice_at_its_own_level_and_a_second_recompute_changes_nothing():
    """Running recompute twice changes nothing the second time, also while the payment-flow guard
    holds bad debt: the held invoice keeps its own level (its rules below suspended), not the
    account's stored level, which another invoice crossing a threshold in the same recompute raises."""
    subs = (Subscription("sub_1", "active", ("prod_core",)), Subscription("sub_2", "active", ("prod_other",)))
    b_failed = NOW - timedelta(days=14, minutes=1)  # in_b crossed its 14-day (limited) threshold a minute ago
    a = invoice("in_a", failed_days_ago=5)
    b = replace(invoice("in_b", failed_days_ago=None, sub="sub_2", product="prod_other"),
                created=b_failed - timedelta(hours=1), first_failed_at=b_failed, last_failed_at=b_failed,
                attempt_count=1)
    failures = (attempt("pi_a", "in_a", days_ago=5),
                replace(attempt("pi_b", "in_b", days_ago=0), attempted_at=b_failed))
    before = decide(snapshot(a, b, attempts=failures, subscriptions=subs), now=NOW - timedelta(minutes=2))
    assert (before.state.status, before.state.level) == (Status.PAST_DUE, Level.RESTRICT_PREMIUM)
    # in_a marked uncollectible while the customer is paying it on the hosted page (3-D Secure open)
    marked = replace(a, status="uncollectible", marked_uncollectible_at=NOW - timedelta(seconds=30))
    paying = replace(attempt("pi_live", "in_a", days_ago=0, status="requires_action"),
                     attempted_at=NOW - timedelta(minutes=5))
    snap = snapshot(marked, b, attempts=(*failures, paying), subscriptions=subs)
    first = decide(replace(snap, stored=before.state))
    assert (first.state.status, first.state.level) == (Status.PAST_DUE, Level.LIMITED)
    assert "guard.payment_in_flight" in rules(first)
    assert {x.invoice.id: x.level for x in first.assessments} == {"in_a": Level.NOTICE, "in_b": Level.LIMITED}
    second = decide(replace(snap, stored=first.state))
    assert second.state.changed_fields(first.state) == [] and derive_events(first.state, second, NOW) == []


def test_bad_debt_payment_in_flight_is_lifting_and_a_failed_one_returns_to_bad_debt():
    pending = BadDebtPayment(id=1, state="pending", amount=5000, created_at=days(0.01), updated_at=days(0.01))
    decision = decide(_suspended_snapshot(bad_debt_payments=(pending,)))
    assert decision.state.status == Status.LIFTING and not decision.bad_debt
    assert decision.lifting_since == pending.created_at
    failed = replace(pending, state="failed", failure_reason="card_declined: insufficient_funds")
    decision = decide(_suspended_snapshot(bad_debt_payments=(failed,)))
    assert decision.state.status == Status.BAD_DEBT
    assert "bad_debt.payment_failed" in rules(decision)


def test_a_lifting_accounts_failed_payment_returns_it_to_bad_debt_whatever_else_is_paying():
    """The guard holds entering bad debt only. Lifting, the bad-debt payment fails while the
    customer's own SEPA payment on the hosted page is processing: back to bad debt, the same
    episode and cancellation, not out of bad debt (and into it again, a new episode, later)."""
    entered = decide(_suspended_snapshot(), now=NOW - timedelta(hours=1))
    assert entered.state.status == Status.BAD_DEBT
    pending = BadDebtPayment(id=1, state="pending", amount=5000, created_at=NOW - timedelta(minutes=20),
                             updated_at=NOW - timedelta(minutes=20), stripe_payment_intent_id="pi_bd")
    lifting = decide(replace(_suspended_snapshot(bad_debt_payments=(pending,)), stored=entered.state),
                     now=NOW - timedelta(minutes=15))
    assert lifting.state.status == Status.LIFTING
    failed = replace(pending, state="failed", updated_at=NOW, failure_reason="declined: insufficient_funds")
    base = _suspended_snapshot(bad_debt_payments=(failed,))
    sepa = attempt("pi_hosted", "in_1", days_ago=5 / 1440, status="processing", pm="pm_sepa")
    after = decide(replace(base, attempts=(*base.attempts, sepa), stored=lifting.state))
    assert after.state.status == Status.BAD_DEBT and after.bad_debt
    assert "guard.payment_in_flight" not in rules(after)
    assert after.state.actions_requested == entered.state.actions_requested
    events = [e.name for e in derive_events(lifting.state, after, NOW, NOW - timedelta(hours=1))]
    assert "BadDebtExited" not in events and "ConsequenceEased" not in events
    # entering bad debt is still held by the same payment in flight
    held = decide(replace(base, attempts=(*base.attempts, sepa), stored=None))
    assert held.state.status == Status.PAST_DUE and "guard.payment_in_flight" in rules(held)


def test_another_accounts_bad_debt_payment_in_flight_holds_the_invoices_it_covers_below_bad_debt():
    """Another team moved the customer here while the old account's bad-debt payment ran: its
    invoices are this account's now, but the customer is paying them. Held below bad debt (no
    cancellation), not lifting (this account made no payment); the same decision twice; a payment
    covering another invoice holds nothing, and once it failed the account enters bad debt."""
    theirs = BadDebtPayment(id=9, state="pending", amount=5000, created_at=days(2), updated_at=days(2),
                            invoice_ids=("in_1",))
    snap = _suspended_snapshot(payments_elsewhere=(theirs,))
    held = decide(snap)
    assert (held.state.status, held.bad_debt, held.lifting_since) == (Status.PAST_DUE, False, None)
    assert held.state.level != Level.SUSPENDED and held.state.actions_requested == ()
    assert "guard.payment_elsewhere" in rules(held) and "guard.lifting" not in rules(held)
    again = decide(replace(snap, stored=held.state))
    assert again.state.changed_fields(held.state) == [] and derive_events(held.state, again, NOW) == []
    entered = decide(_suspended_snapshot())
    assert entered.state.status == Status.BAD_DEBT and entered.state.actions_requested == ("cancel:sub_1",)
    elsewhere = decide(_suspended_snapshot(payments_elsewhere=(replace(theirs, invoice_ids=("in_other",)),)))
    assert elsewhere.state == entered.state
    failed = decide(replace(_suspended_snapshot(), stored=held.state))
    assert failed.state.status == Status.BAD_DEBT
    assert "BadDebtEntered" in [e.name for e in derive_events(held.state, failed, NOW)]


# --- resolution, refunds, mandates ----------------------------------------------------------------

def test_resolution_says_paid_or_resolved():
    from app.domain.state import DunningState

    stored = DunningState(status="past_due", level="notice", unpaid_since=days(3))
    paid = invoice(status="paid", failed_days_ago=3)
    paid = replace(paid, paid_at=days(0.1))
    assert decide(replace(snapshot(paid), stored=stored)).resolution == "paid"
    void = replace(invoice(status="void", failed_days_ago=3), voided_at=days(0.1), amount_remaining=0)
    assert decide(replace(snapshot(void), stored=stored)).resolution == "resolved"
    # the debt forgiven while an unrelated invoice was paid on time meanwhile: still "resolved"
    annual = replace(invoice("in_annual", status="paid", failed_days_ago=None), paid_at=days(1))
    assert decide(replace(snapshot(void, annual), stored=stored)).resolution == "resolved"
    # out of bad debt by paying it while a newer invoice is still unpaid: "paid", not "recomputed"
    in_bad_debt = DunningState(status="bad_debt", level="suspended", unpaid_since=days(3))
    newer = invoice("in_newer", failed_days_ago=1)
    left = decide(replace(snapshot(paid, newer), stored=in_bad_debt))
    assert left.state.status == Status.PAST_DUE and left.resolution == "paid"


def test_a_debt_written_off_is_resolved_though_an_invoice_not_due_yet_was_paid_meanwhile():
    """An invoice sent with payment terms is no debt before its due date, whatever an early payment on
    the hosted page did: paid before it, it says nothing of how the debt ended (voided: resolved)."""
    subs = (Subscription("sub_1", "active", ("prod_core",)), Subscription("sub_2", "active", ("prod_other",)))
    written_off = replace(invoice("in_a", status="uncollectible", failed_days_ago=40), marked_uncollectible_at=days(20))
    terms = replace(invoice("in_c", failed_days_ago=5, sub="sub_2", product="prod_other"),
                    created=days(10), due_date=NOW + timedelta(days=20))  # declined early on the hosted page
    in_debt = decide(snapshot(written_off, terms, subscriptions=subs), now=days(2))
    assert in_debt.state.status == Status.BAD_DEBT and [a.invoice.id for a in in_debt.assessments] == ["in_a"]
    voided = replace(written_off, status="void", amount_remaining=0, voided_at=days(0.5))
    paid_early = replace(terms, status="paid", amount_paid=5000, amount_remaining=0, paid_at=days(1))
    after = decide(replace(snapshot(voided, paid_early, subscriptions=subs), stored=in_debt.state))
    assert after.state.status == Status.CURRENT and after.resolution == "resolved"
    exited = next(e for e in derive_events(in_debt.state, after, NOW, days(20)) if e.name == "BadDebtExited")
    assert exited.payload()["how"] == "resolved"


def test_refund_never_creates_debt():
    paid = invoice(status="paid", failed_days_ago=None)
    refunded = attempt("pi_1", "in_1", days_ago=5, status="succeeded", amount=5000, amount_refunded=5000)
    assert decide(snapshot(paid, attempts=(refunded,))).state.status == Status.CURRENT


def test_mandates_reflect_what_dunning_knows():
    methods = (
        method("pm_expired", exp_month=1, exp_year=2026),
        method("pm_blocked", changed_days_ago=10),
        method("pm_action", changed_days_ago=10),
        method("pm_gone", attached=False),
        method("pm_ok", exp_month=12, exp_year=2030),
    )
    attempts = (
        attempt("pi_1", "in_1", days_ago=2, decline="stolen_card", pm="pm_blocked"),
        attempt("pi_2", "in_1", days_ago=1, decline="incorrect_cvc", pm="pm_action"),
    )
    decision = decide(snapshot(invoice(failed_days_ago=2), attempts=attempts, payment_methods=methods,
                               default_payment_method_id="pm_ok"))
    by_id = {m.payment_method_id: m for m in decision.mandates}
    assert by_id["pm_expired"].status == "expired"
    assert by_id["pm_blocked"].status == "blocked" and "stolen_card" in (by_id["pm_blocked"].status_reason or "")
    assert by_id["pm_action"].status == "needs_action"
    assert by_id["pm_gone"].status == "detached"
    assert by_id["pm_ok"].status == "usable" and by_id["pm_ok"].is_default


def test_each_customers_default_is_a_default_mandate_on_an_account_with_several_customers():
    methods = (method("pm_1", changed_days_ago=30, stripe_customer_id="cus_1"),
               method("pm_1b", changed_days_ago=20, stripe_customer_id="cus_1"),
               method("pm_2", changed_days_ago=1, stripe_customer_id="cus_2"))
    defaults = (CustomerDefault("cus_2", "pm_2", days(1)), CustomerDefault("cus_1", "pm_1", days(30)))
    decision = decide(snapshot(invoice(failed_days_ago=2, stripe_customer_id="cus_1"), payment_methods=methods,
                               default_payment_method_id="pm_2", default_payment_method_changed_at=days(1),
                               customer_defaults=defaults))
    assert {m.payment_method_id: m.is_default for m in decision.mandates} == {"pm_1": True, "pm_1b": False,
                                                                               "pm_2": True}


def test_a_blocked_mandate_names_the_code_that_decided_it():
    """A bank debit's mandate revoked: its charge's failure code decided (permanent), not the intent's
    generic decline code beside it."""
    revoked = attempt("py_1", "in_1", days_ago=1, decline="generic_decline", pm="pm_sepa",
                      failure_code="debit_not_authorized")
    decision = decide(snapshot(invoice(failed_days_ago=1), attempts=(revoked,),
                               payment_methods=(method("pm_sepa", changed_days_ago=10),)))
    [mandate] = decision.mandates
    assert (mandate.status, mandate.status_reason) == ("blocked", "permanent decline: debit_not_authorized")


def test_compute_is_deterministic_and_stable_against_its_own_output():
    snap = _suspended_snapshot()
    first = decide(snap)
    again = decide(replace(snap, stored=first.state))
    assert again.state == first.state
    assert again.state.changed_fields(first.state) == []


def test_stripes_own_retries_count_against_the_schedule():
    """Attempts beyond the first (invoice.attempt_count) are retries even without our payment_retry rows."""
    inv = replace(invoice(failed_days_ago=30), attempt_count=7)
    decision = decide(snapshot(inv, attempts=(attempt("pi_1", "in_1", days_ago=1),)))
    assert decision.state.retries_used == 6
    assert decision.state.status == Status.BAD_DEBT  # schedule done and >= 21 days


def test_free_retries_do_not_use_the_budget_even_as_attempts():
    inv = replace(invoice(failed_days_ago=2), attempt_count=2)
    free = retry("in_1", 1, days_ago=1, free=True, pm="pm_new")
    decision = decide(snapshot(inv, attempts=(attempt("pi_1", "in_1", days_ago=2), attempt("pi_2", "in_1", days_ago=1)),
                               retries=(free,)))
    assert decision.state.retries_used == 0


# --- in bad debt, only money gets an account out -------------------------------------------------


def _in_bad_debt(base):
    """``base`` as recomputed once the account was stored in bad debt."""
    stored = compute(base, POLICY, NOW).state
    assert stored.status == Status.BAD_DEBT
    return replace(base, stored=stored, stored_bad_debt_flag=True)


@pytest.mark.parametrize("base", [
    snapshot(invoice(failed_days_ago=30), attempts=(attempt("pi_1", "in_1", days_ago=30, decline="expired_card"),)),
    _suspended_snapshot(),  # the transient schedule run out
], ids=["permanent", "transient_exhausted"])
def test_a_new_card_in_bad_debt_starts_no_automatic_retry_and_lifts_nothing(base):
    """The card the customer adds to pay the debt (through /pay-bad-debt, never the regular
    collection path) is no money yet: a free retry would make the invoice's dunning 'not run out',
    lift bad debt (BadDebtExited, entitlements back) and, when it fails, enter it again with a
    second cancellation."""
    in_bad_debt = _in_bad_debt(base)
    card = method("pm_new", changed_days_ago=0.01)
    decision = decide(replace(in_bad_debt, payment_methods=(card,)))
    assert decision.state.status == Status.BAD_DEBT and decision.state.level == Level.SUSPENDED
    assert decision.state.next_retry_at is None and "retry.none_bad_debt" in rules(decision)
    assert derive_events(in_bad_debt.stored, decision, NOW) == []
    # The same with nothing stored yet: the decision depends on the facts, not on what was stored.
    assert decide(replace(base, payment_methods=(card,))).state == decision.state


def test_a_new_card_before_bad_debt_earns_its_free_retry():
    declined = snapshot(invoice(failed_days_ago=10), attempts=(attempt("pi_1", "in_1", days_ago=10,
                                                                       decline="expired_card"),))
    decision = decide(replace(declined, payment_methods=(method("pm_new", changed_days_ago=0.01),)))
    assert decision.state.status == Status.PAST_DUE and decision.state.level == Level.RESTRICT_PREMIUM
    assert decision.state.retry_free and decision.state.next_retry_at == days(0.01)


def test_a_failed_bad_debt_payment_is_no_attempt_of_the_invoice():
    """The bad-debt payment's intent stands alone (no invoice): its decline must not become the
    invoice's last failure, which would make a permanent decline transient and plan regular retries
    in bad debt."""
    in_bad_debt = _in_bad_debt(snapshot(invoice(failed_days_ago=30), attempts=(
        attempt("pi_1", "in_1", days_ago=30, decline="expired_card"),)))
    payment = BadDebtPayment(id=1, state="failed", amount=5000, created_at=days(0.02), updated_at=days(0.01),
                             failure_reason="declined: insufficient_funds", stripe_payment_intent_id="pi_bd")
    declined = attempt("pi_bd", None, days_ago=0.02, decline="insufficient_funds", amount=5000)
    decision = decide(replace(in_bad_debt, attempts=(*in_bad_debt.attempts, declined), bad_debt_payments=(payment,)))
    assert (decision.state.status, decision.state.level) == (Status.BAD_DEBT, Level.SUSPENDED)
    assert decision.state.failure_class == FailureClass.PERMANENT and decision.state.next_retry_at is None
    assert "bad_debt.payment_failed" in rules(decision)


def test_a_schedule_that_fell_behind_spreads_its_retries_instead_of_firing_them_back_to_back():
    """Expired card on day 0; on day 9 a new card's free retry fails for insufficient funds. The
    transient schedule counts from day 0, so its retries of days 1-7 are all past: each must still
    wait its gap after the previous attempt, not follow it as soon as its outcome arrives."""
    inv = invoice(failed_days_ago=10)
    attempts = [attempt("pi_1", "in_1", days_ago=10, decline="expired_card", pm="pm_old"),
                attempt("pi_2", "in_1", days_ago=1, decline="insufficient_funds", pm="pm_new")]
    retries = [retry("in_1", 1, days_ago=1.005, free=True, pm="pm_new", state="failed")]
    base = snapshot(inv, payment_methods=(method("pm_new", changed_days_ago=1.01),), default_payment_method_id="pm_new")
    now, charged_at = NOW, []
    for n in range(1, 4):  # each retry is charged when due and declined five minutes later
        decision = decide(replace(base, invoices=(replace(inv, attempt_count=len(attempts)),),
                                  attempts=tuple(attempts), retries=tuple(retries)), now=now)
        due = max(decision.state.next_retry_at, now)
        charged_at.append(due)
        retries.append(replace(retry("in_1", n + 1, days_ago=0, pm="pm_new"), created_at=due, scheduled_for=due))
        attempts.append(replace(attempt(f"pi_r{n}", "in_1", days_ago=0, pm="pm_new"),
                                attempted_at=due + timedelta(minutes=5)))
        now = due + timedelta(minutes=40)
    gaps = [later - earlier for earlier, later in pairwise(charged_at)]
    assert charged_at[0] == days(1) + timedelta(days=1)  # the first: one day (day 1's gap) after the decline
    assert all(gap >= timedelta(days=2) for gap in gaps), gaps  # days 3, 5, 7: two days apart
    assert "retry.scheduled" in rules(decision)


def test_an_invoice_not_due_yet_is_no_debt_whatever_an_early_payment_did():
    """Net terms: the customer tried to pay early on the hosted page and was declined. Nothing is
    past due before its due date: no level, no retry, no bad debt; from the due date the invoice is
    debt, unpaid since then."""
    early = attempt("pi_1", "in_1", days_ago=22, decline="expired_card")
    not_due = replace(invoice(failed_days_ago=22), due_date=NOW + timedelta(days=8))
    decision = decide(snapshot(not_due, attempts=(early,)))
    assert (decision.state.status, decision.state.level) == (Status.CURRENT, Level.NONE)
    assert decision.state.next_retry_at is None and decision.state.actions_requested == ()
    assert decision.state.next_review_at == not_due.due_date  # no event need come then: beat looks again
    later = NOW + timedelta(days=9)  # a day past the due date
    overdue = decide(snapshot(not_due, attempts=(early,)), now=later)
    assert overdue.state.status == Status.PAST_DUE and overdue.state.unpaid_since == not_due.due_date
    assert overdue.state.level == Level.NOTICE  # unpaid 1 day, not 31: restrict_premium waits 3 days


def test_an_unlinked_attempt_goes_to_the_invoice_that_failed_at_that_moment():
    """Two open invoices of one price: Stripe retries the older one, whose invoice.payment_failed
    comes with the charge's decline. The charge names no invoice; the invoice that failed at that
    very moment is the one it was paying, not the newer one of the same amount."""
    older = replace(invoice("in_a", failed_days_ago=38, attempt_count=2), created=days(40), last_failed_at=days(2))
    newer = replace(invoice("in_b", failed_days_ago=9), created=days(10))
    unlinked = attempt("pi_retry", None, days_ago=2, decline="expired_card", amount=5000)
    grouped = attempts_by_invoice(snapshot(older, newer, attempts=(unlinked,)))
    assert [a.id for a in grouped.get("in_a", [])] == ["pi_retry"] and "in_b" not in grouped
    # With no invoice failing at its moment, the latest open one of its amount, as before.
    elsewhere = replace(unlinked, attempted_at=days(1))
    assert [a.id for a in attempts_by_invoice(snapshot(older, newer, attempts=(elsewhere,)))["in_b"]] == ["pi_retry"]


def test_a_small_balance_keeps_its_free_retry_on_a_new_card():
    """Capped at notice, never bad debt: the new card is its way to pay (no bad-debt payment for it)."""
    snap = snapshot(invoice(failed_days_ago=25, amount=300),
                    attempts=(attempt("pi_1", "in_1", days_ago=25, decline="expired_card"),),
                    payment_methods=(method("pm_2", changed_days_ago=0.01),))
    decision = decide(snap)
    assert (decision.state.status, decision.state.level) == (Status.PAST_DUE, Level.NOTICE)
    assert decision.state.retry_free and decision.state.next_retry_at is not None
    assert "retry.none_bad_debt" not in rules(decision)


def test_an_invoice_marked_uncollectible_before_its_due_date_keeps_its_start():
    """Nothing moves the start of an uncollectible invoice's debt when its due date passes."""
    inv = replace(invoice(failed_days_ago=None, status="uncollectible"), created=days(40),
                  due_date=NOW + timedelta(days=5), marked_uncollectible_at=days(30))
    assert decide(snapshot(inv)).state.unpaid_since == days(30)
    assert decide(snapshot(inv), now=NOW + timedelta(days=6)).state.unpaid_since == days(30)


def test_a_failed_bad_debt_payment_filed_under_an_invoice_not_yet_debt_is_announced():
    """Two invoices in bad debt paid together by one bad-debt payment, and a newer open invoice of
    another subscription, not failed yet: the standalone intent is filed under the newer one; its
    decline is still a failed payment."""
    a, b, first = two_invoices_in_bad_debt()
    c = replace(invoice("in_c", failed_days_ago=None, sub="sub_2", product="prod_other"), created=days(1))
    declined, payment = declined_bad_debt_payment(days_ago=0.01)
    subs = TWO_SUBSCRIPTIONS
    before = decide(snapshot(a, b, c, attempts=first, subscriptions=subs))
    assert before.state.status == Status.BAD_DEBT
    after = decide(replace(snapshot(a, b, c, attempts=(*first, declined), bad_debt_payments=(payment,),
                                    subscriptions=subs), stored=before.state))
    failed = [e.payload() for e in derive_events(before.state, after, NOW) if e.name == "PaymentFailed"]
    assert failed == [{"attempt_id": "pi_bd", "failure_class": "transient"}]


def test_marking_an_overdue_invoice_uncollectible_keeps_its_debt_start_at_the_due_date():
    """Payment terms, due 20 days ago, an early hosted-page failure 35 days ago: the debt starts at the
    due date while open, and still when marked uncollectible."""
    early = (attempt("pi_1", "in_1", days_ago=35),)
    inv = replace(invoice(failed_days_ago=35), created=days(50), due_date=days(20))
    assert decide(snapshot(inv, attempts=early)).state.unpaid_since == days(20)
    marked = replace(inv, status="uncollectible", marked_uncollectible_at=days(1))
    assert decide(snapshot(marked, attempts=early)).state.unpaid_since == days(20)


def test_an_old_failed_bad_debt_payment_is_not_announced_again_when_a_new_invoice_opens():
    """Its debt long settled; a new invoice is finalized (open, nothing failed): no PaymentFailed."""
    old = invoice("in_old", status="paid", failed_days_ago=90, paid_at=days(40))
    declined = attempt("pi_bd", None, days_ago=50, decline="insufficient_funds")  # the standalone intent
    payment = BadDebtPayment(id=1, state="failed", amount=5000, created_at=days(50), updated_at=days(50),
                             stripe_payment_intent_id="pi_bd")
    settled = snapshot(old, attempts=(declined,), bad_debt_payments=(payment,))
    current = decide(settled)
    opened = decide(replace(settled, invoices=(old, invoice("in_new", failed_days_ago=None)), stored=current.state))
    assert [e for e in derive_events(current.state, opened, NOW) if e.name == "PaymentFailed"] == []


def _bad_debt_paid_on_a_second_try(c):
    """in_a and in_b in bad debt; a bad-debt payment declined 5 days ago (its standalone intent filed
    under the newer open invoice c, of another subscription), a second one paid both 3 days ago."""
    a, b, first = two_invoices_in_bad_debt()
    declined, failed_pay = declined_bad_debt_payment(days_ago=5)
    ok = attempt("pi_bd2", None, days_ago=3, status="succeeded", amount=10000)
    ok_pay = BadDebtPayment(id=2, state="succeeded", amount=10000, created_at=days(3), updated_at=days(3),
                            stripe_payment_intent_id="pi_bd2")
    paid: dict[str, Any] = {"status": "paid", "amount_paid": 5000, "amount_remaining": 0, "paid_at": days(3)}
    return snapshot(replace(a, **paid), replace(b, **paid), c, attempts=(*first, declined, ok),
                    bad_debt_payments=(failed_pay, ok_pay), subscriptions=TWO_SUBSCRIPTIONS)


@pytest.mark.parametrize("becomes_debt", ["fails_without_detail", "terms_come_due"])
def test_an_old_failed_bad_debt_payment_filed_under_an_invoice_that_becomes_debt_is_not_announced(becomes_debt):
    """A bad-debt payment's decline is announced only when it failed during the present debt, also
    when _owner filed its intent under the invoice that is now unpaid: that debt began after it."""
    c = replace(invoice("in_c", failed_days_ago=None, sub="sub_2", product="prod_other"), created=days(6))
    if becomes_debt == "terms_come_due":
        c = replace(c, due_date=days(0.5))
    settled = _bad_debt_paid_on_a_second_try(c)
    current = decide(settled, now=NOW - timedelta(days=1))
    assert current.state.status == Status.CURRENT and current.state.last_failure_id is None
    if becomes_debt == "fails_without_detail":  # its invoice.payment_failed, the attempt's detail not yet
        c = replace(c, first_failed_at=days(0.01), last_failed_at=days(0.01), attempt_count=1)
    opened = decide(replace(settled, invoices=(*settled.invoices[:2], c), stored=current.state))
    assert opened.state.status == Status.PAST_DUE and opened.state.last_failure_id is None
    assert [e for e in derive_events(current.state, opened, NOW) if e.name == "PaymentFailed"] == []
