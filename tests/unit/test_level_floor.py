"""DESIGN 4's levels: "none" is "nothing unpaid"; an unpaid invoice is at least at "notice" (full access,
the customer notified). A policy file whose rules leave some unpaid invoice unmatched (no rule without
conditions at the end: a notice rule from day 1, say) must not leave an account that owes at level
none: past due, and nobody told."""

from __future__ import annotations

import dataclasses

from app.domain.compute import compute
from app.domain.policy import LevelRule
from app.domain.state import Level, Status
from tests.unit.builders import NOW, attempt, invoice, policy, snapshot

DEFAULT = policy()
# The default rules, with notice only from day 1.
FROM_DAY_1 = dataclasses.replace(DEFAULT, rules=(*(r for r in DEFAULT.rules if r.level != Level.NOTICE),
                                                  LevelRule(Level.NOTICE, min_days=1)))


def test_an_unpaid_invoice_no_rule_matches_is_at_notice_and_says_why():
    snap = snapshot(invoice(failed_days_ago=0.5), attempts=(attempt("pi_1", "in_1", days_ago=0.5),))
    decision = compute(snap, FROM_DAY_1, NOW)
    assert decision.state.status == Status.PAST_DUE
    assert decision.state.level == Level.NOTICE
    [reason] = [r for r in decision.reasons if r.rule.startswith("level.")]
    assert reason.rule == "level.notice" and "no rule matched" in reason.detail
    assert reason.facts["invoice"] == "in_1" and reason.facts["rule"] == {}
    assert decision.state.entitlements["products"] == {"prod_core": "full"}


def test_the_rule_that_matches_still_decides():
    snap = snapshot(invoice(failed_days_ago=1.5), attempts=(attempt("pi_1", "in_1", days_ago=1.5),))
    [reason] = [r for r in compute(snap, FROM_DAY_1, NOW).reasons if r.rule.startswith("level.")]
    assert reason.rule == "level.notice" and reason.facts["rule"] == {"min_days": 1}
    assert "no rule matched" not in reason.detail
