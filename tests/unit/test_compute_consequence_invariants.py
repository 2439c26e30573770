"""More properties of compute's graduated consequences (DESIGN section 4), over the generated
multi-invoice accounts of test_compute_multi_invoice_properties:

- an unpaid upgrade acts on its own products only: taking it out of an account changes no regular
  invoice's level, no bad debt, no cancellation and no other product's access, also with the
  decision before it stored (as the fleet runs it);
- a time is a moment: the same snapshot with every time in another UTC offset decides the same;
- whatever a valid policy file says (rules, small-balance threshold, upgrade cap), an upgrade stays
  at or under its cap and alone never makes bad debt, small balances stay at notice at most, only
  the unpaid invoices' products are touched, bad debt comes only from a suspended regular invoice,
  and time alone never eases the level.
"""

from __future__ import annotations

import dataclasses
import tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.domain.compute import compute
from app.domain.policy import LevelRule, Policy, PolicyError, parse_policy
from app.domain.snapshot import Charge, Snapshot
from app.domain.state import Access, Level, Status
from tests.unit.builders import NOW, attempt, invoice, policy, retry, snapshot
from tests.unit.test_compute_multi_invoice_properties import SETTINGS, accounts, products_of, unpaid_ids

POLICY = policy()
DEFAULT_FILE = tomllib.loads((Path(__file__).parents[2] / "app" / "policy" / "default.toml").read_text())
CLASSES = ["permanent", "action_required", "transient", "unknown"]


def without_upgrade(snap: Snapshot) -> Snapshot:
    return dataclasses.replace(snap, invoices=tuple(i for i in snap.invoices if i.id != "in_up"),
                               attempts=tuple(a for a in snap.attempts if a.invoice_id != "in_up"),
                               retries=tuple(r for r in snap.retries if r.invoice_id != "in_up"))


def stored_then(snap: Snapshot, back: float):
    """The decision ``back`` days ago stored (its bad-debt episode opened then), then today's."""
    earlier = NOW - timedelta(days=back)
    first = compute(snap, POLICY, earlier)
    snap = dataclasses.replace(snap, stored=first.state, stored_bad_debt_flag=first.bad_debt,
                               open_episode_entered_at=earlier if first.bad_debt else None)
    return compute(snap, POLICY, NOW)


@SETTINGS
@given(account=accounts(upgrade=True), back=st.none() | st.floats(0.01, 20))
def test_an_unpaid_upgrade_changes_nothing_of_the_regular_invoices(account, back):
    snap = account.snapshot
    if any(a.invoice_id is None for a in snap.attempts):
        return  # which invoice an unlinked attempt paid is a guess, and the upgrade is a candidate
    if back is None:
        with_it, without = compute(snap, POLICY, NOW), compute(without_upgrade(snap), POLICY, NOW)
    else:
        with_it, without = stored_then(snap, back), stored_then(without_upgrade(snap), back)
    assert with_it.bad_debt == without.bad_debt
    assert with_it.bad_debt_products == without.bad_debt_products
    assert [a for a in with_it.state.actions_requested if not a.startswith("revert:")] == list(
        without.state.actions_requested)
    assert {a.invoice.id: a.level for a in with_it.assessments if a.invoice.id != "in_up"} == {
        a.invoice.id: a.level for a in without.assessments}
    upgrade = next(i for i in snap.invoices if i.id == "in_up")
    for product, allowed in without.state.entitlements["products"].items():
        if product not in upgrade.products and product not in upgrade.credited_products:
            assert with_it.state.entitlements["products"][product] == allowed, product


def shifted(value: Any, tz: timezone) -> Any:
    """``value`` with every time in it expressed in ``tz``."""
    if isinstance(value, datetime):
        return value.astimezone(tz)
    if isinstance(value, tuple):
        return tuple(shifted(v, tz) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: shifted(getattr(value, f.name), tz)
                                             for f in dataclasses.fields(value) if f.init and f.name != "extra"})
    return value


@SETTINGS
@given(account=accounts(), minutes=st.integers(-12 * 60, 14 * 60), later=st.floats(0, 30))
def test_the_decision_does_not_depend_on_the_utc_offset_of_its_times(account, minutes, later):
    tz = timezone(timedelta(minutes=minutes))
    now = NOW + timedelta(days=later)
    utc = compute(account.snapshot, POLICY, now)
    other = compute(shifted(account.snapshot, tz), POLICY, now.astimezone(tz))
    for name in ("status", "level", "actions_requested", "entitlements", "unpaid_since", "next_review_at",
                 "next_retry_at", "retries_used", "outstanding_amount"):
        assert getattr(utc.state, name) == getattr(other.state, name), name
    assert [r.rule for r in utc.reasons] == [r.rule for r in other.reasons]


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    """A valid policy file: rules from the most severe level down, any conditions."""
    rules = []
    for level in ("suspended", "limited", "restrict_premium", "notice"):
        for _ in range(draw(st.integers(0, 2))):
            when: dict[str, Any] = {}
            if level == "suspended":
                when[draw(st.sampled_from(["retries_exhausted", "marked_uncollectible"]))] = True
            if draw(st.booleans()):
                when["min_days"] = draw(st.integers(0, 30))
            if draw(st.booleans()):
                when["failure_classes"] = draw(st.lists(st.sampled_from(CLASSES), min_size=1, unique=True))
            if draw(st.booleans()):
                when["min_attempts"] = draw(st.integers(0, 5))
            if draw(st.booleans()):
                when["min_balance"] = draw(st.dictionaries(st.sampled_from(["usd", "eur", "krw", "jpy"]),
                                                           st.integers(0, 20_000), min_size=1))
            rules.append({"level": level, "when": when})
    consequences = {"small_balance_threshold": draw(st.integers(0, 3000)),
                    "upgrade_max_level": draw(st.sampled_from(["notice", "restrict_premium", "limited"])),
                    "rules": rules or [{"level": "notice", "when": {}}]}
    while True:
        try:
            return parse_policy({**DEFAULT_FILE, "consequences": consequences})
        except PolicyError as exc:
            # A rule a more severe one always matches first is refused (it never applies): the
            # policy without it decides the same.
            if not exc.problem.startswith("can never match"):
                raise
            del rules[int(exc.key.removeprefix("consequences.rules[").rstrip("]"))]


@SETTINGS
@given(account=accounts(), pol=policies(), later=st.floats(0.01, 30))
def test_the_rules_of_design_4_hold_under_any_valid_policy(account, pol, later):
    decision = compute(account.snapshot, pol, NOW)
    state = decision.state
    regular = [a for a in decision.assessments if not a.invoice.is_upgrade]
    if not regular:
        assert not decision.bad_debt and state.status in (Status.CURRENT, Status.PAST_DUE)
    balance: dict[str, int] = {}
    for a in regular:
        balance[a.invoice.currency] = balance.get(a.invoice.currency, 0) + a.invoice.amount_remaining
    for a in decision.assessments:
        if a.invoice.is_upgrade:
            assert a.level.rank <= pol.upgrade_max_level.rank, a
        elif balance[a.invoice.currency] < pol.small_balance_threshold_in(a.invoice.currency):
            assert a.level.rank <= Level.NOTICE.rank, a
    if decision.bad_debt:
        assert any(a.level == Level.SUSPENDED for a in regular)
    unpaid = unpaid_ids(decision)
    on_unpaid = products_of(account.snapshot, lambda i: i.id in unpaid)
    for product, allowed in state.entitlements["products"].items():
        if product not in on_unpaid:
            assert allowed == Access.FULL, product
    later_state = compute(account.snapshot, pol, NOW + timedelta(days=later)).state
    assert Level(later_state.level).rank >= Level(state.level).rank, (state, later_state)


# --- a rule's min_attempts ----------------------------------------------------------------------


def _retried(charges: int) -> Snapshot:
    """An invoice that failed 6 days ago and was charged ``charges`` times on its one payment intent:
    the first attempt and our retries, which Stripe confirms on the same intent (one attempt row,
    a charge each) and does not count in its attempt_count (that counts its own retries only)."""
    first = NOW - timedelta(days=6)
    sent = [1, 3, 5][:charges - 1]
    inv = invoice("in_1", failed_days_ago=6)
    att = attempt("pi_1", "in_1", days_ago=6 - (sent[-1] if sent else 0),
                  charges=(Charge("ch_0", "pm_1", first),
                           *(Charge(f"ch_{d}", "pm_1", first + timedelta(days=d)) for d in sent)))
    return snapshot(inv, attempts=(att,),
                    retries=tuple(retry("in_1", n, days_ago=6 - d, state="failed") for n, d in enumerate(sent, 1)))


@pytest.mark.parametrize(("charges", "level"), [(3, Level.NOTICE), (4, Level.LIMITED)])
def test_a_rules_min_attempts_counts_every_charge_of_the_invoice(charges, level):
    """A policy rule ``min_attempts`` counts the invoice's attempts, our retries included. Before,
    it read Stripe's attempt_count (which our POST /v1/invoices/<id>/pay retries never raise) and the
    number of attempt rows (one per payment intent, which every retry reuses): 1 however many
    times the invoice was charged, so a rule on attempts never matched."""
    suspended = [r for r in POLICY.rules if r.level == Level.SUSPENDED]
    below = [r for r in POLICY.rules if r.level != Level.SUSPENDED]
    pol = dataclasses.replace(POLICY, rules=(*suspended, LevelRule(Level.LIMITED, min_attempts=4), *below))
    decision = compute(_retried(charges), pol, NOW)
    [assessed] = decision.assessments
    assert assessed.attempts == charges
    assert decision.state.level == level


def test_a_rule_matched_on_attempts_or_balance_names_them_in_its_reason():
    """Every decision carries its reasons, which rule matched on which facts: a rule's min_attempts
    or min_balance matched on the invoice's attempts or its currency's balance, which its reason
    now names (it named the rule's conditions, and neither fact)."""
    suspended = [r for r in POLICY.rules if r.level == Level.SUSPENDED]
    below = [r for r in POLICY.rules if r.level != Level.SUSPENDED]
    on_attempts = dataclasses.replace(POLICY, rules=(*suspended, LevelRule(Level.LIMITED, min_attempts=4), *below))
    [reason] = [r for r in compute(_retried(4), on_attempts, NOW).reasons if r.rule.startswith("level.")]
    assert (reason.rule, reason.facts["attempts"]) == ("level.limited", 4)
    on_balance = dataclasses.replace(POLICY, rules=(*suspended, LevelRule(Level.LIMITED, min_balance={"usd": 4000}),
                                                    *below))
    [reason] = [r for r in compute(_retried(1), on_balance, NOW).reasons if r.rule.startswith("level.")]
    assert (reason.rule, reason.facts["balance"], reason.facts["currency"]) == ("level.limited", 5000, "usd")
    # The default policy's rules read neither: their reasons stay as they were.
    [reason] = [r for r in compute(_retried(4), POLICY, NOW).reasons if r.rule.startswith("level.")]
    assert "attempts" not in reason.facts and "balance" not in reason.facts
