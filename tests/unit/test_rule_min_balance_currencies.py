"""A consequence rule's min_balance in each currency's own terms, as the small-balance thresholds
(test_small_balance_currencies.py).

Amounts are in the currency's minor unit, and a rule's min_balance was one number for every currency:
"limited from day 3 when at least $50 is owed" (5000) matched 50.00 rupiah (a fraction of a cent) and
5000 yen (about $33) as it did $50. A rule now names its amount per currency, a table of currency code
= minor units; a currency the table does not name does not meet the condition, so the rule does not
match and a rule below it (less severe: rules go from the most severe level down) is tried. One number
stops start-up, naming the key.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from app.domain.compute import compute
from app.domain.policy import Policy, PolicyError, parse_policy
from app.domain.state import Level, Status
from app.policy_file import DEFAULT_POLICY, load_policy
from tests.unit.builders import NOW, invoice, snapshot

# The default rules with one more: limited from day 3 when at least $50, 50 euros or 7,500 yen is owed.
AT_LEAST_50 = {"usd": 5000, "eur": 5000, "jpy": 7500}


def default_data() -> dict[str, Any]:
    return tomllib.loads(DEFAULT_POLICY.read_text())


def with_rule(when: dict[str, Any], level: str = "limited", at: int = 3) -> dict[str, Any]:
    data = default_data()
    data["consequences"]["rules"].insert(at, {"level": level, "when": when})
    return data


@pytest.fixture(scope="module")
def at_least_50() -> Policy:
    return parse_policy(with_rule({"min_days": 3, "min_balance": AT_LEAST_50}))


@pytest.mark.parametrize(("currency", "amount", "level"), [
    ("usd", 6000, Level.LIMITED),  # $60
    ("usd", 4000, Level.NOTICE),  # $40
    ("jpy", 8000, Level.LIMITED),  # 8,000 yen, zero-decimal: about $53
    ("jpy", 6000, Level.NOTICE),  # 6,000 yen, about $40: was limited, 6000 >= 5000
    ("huf", 600_000, Level.NOTICE),  # 6,000 forint, about $17, a currency the rule does not name
])
def test_a_rules_min_balance_is_in_each_currencys_own_terms(at_least_50, currency, amount, level):
    decision = compute(snapshot(invoice(failed_days_ago=5, amount=amount, currency=currency)), at_least_50, NOW)
    assert decision.state.level == level and decision.state.status == Status.PAST_DUE
    [reason] = [r for r in decision.reasons if r.rule.startswith("level.")]
    assert reason.rule == f"level.{level.value}"
    if level == Level.LIMITED:  # the rule names the balance and currency it matched on
        assert (reason.facts["balance"], reason.facts["currency"]) == (amount, currency)
        assert reason.facts["rule"]["min_balance"] == AT_LEAST_50


def test_a_currency_the_rule_does_not_name_never_meets_it_however_much_is_owed(at_least_50):
    """No amount for the currency: the rule is not for it. The next rule down decides (here notice:
    the default rules from day 7 are not reached yet), never a more severe one."""
    huge = invoice(failed_days_ago=5, amount=10**11, currency="chf")
    assert compute(snapshot(huge), at_least_50, NOW).state.level == Level.NOTICE
    later = compute(snapshot(invoice(failed_days_ago=8, amount=10**11, currency="chf")), at_least_50, NOW)
    assert later.state.level == Level.RESTRICT_PREMIUM  # the default restrict_premium rule from day 7


def test_a_bad_debt_rule_on_a_balance_never_suspends_a_currency_it_does_not_name():
    """A suspended rule with a min_balance: an invoice written off in another currency is no bad debt
    by it (the uncollectible rule above it is replaced by one for big debts only)."""
    data = default_data()
    data["consequences"]["rules"][0]["when"]["min_balance"] = {"usd": 10_000}
    pol = parse_policy(data)
    written_off = {c: invoice(status="uncollectible", failed_days_ago=15, amount=50_000, currency=c)
                   for c in ("usd", "jpy")}
    assert compute(snapshot(written_off["usd"]), pol, NOW).state.status == Status.BAD_DEBT
    in_yen = compute(snapshot(written_off["jpy"]), pol, NOW)
    assert in_yen.state.status == Status.PAST_DUE and in_yen.state.level == Level.LIMITED  # day 14 rule


def test_currency_codes_are_read_in_any_case():
    pol = parse_policy(with_rule({"min_days": 3, "min_balance": {"USD": 5000, " Jpy ": 7500}}))
    [rule] = [r for r in pol.rules if r.min_balance is not None]
    assert dict(rule.min_balance or {}) == {"usd": 5000, "jpy": 7500}
    assert rule.balance_meets(5000, "USD") and not rule.balance_meets(4999, "usd")
    assert not rule.balance_meets(10**9, "eur")


def test_the_table_is_written_inline_in_the_file(tmp_path: Path):
    text = DEFAULT_POLICY.read_text()
    limited = 'level = "limited"\nwhen = { min_days = 14 }'
    assert limited in text
    file = tmp_path / "policy.toml"
    file.write_text(text.replace(limited, 'level = "limited"\nwhen = { min_days = 14, min_balance = { usd = 5000 } }'))
    [rule] = [r for r in load_policy(file).rules if r.level == Level.LIMITED]
    assert dict(rule.min_balance or {}) == {"usd": 5000}


@pytest.mark.parametrize(("min_balance", "key", "problem"), [
    (5000, "consequences.rules[3].when.min_balance", "must be a table of currency code"),
    (0, "consequences.rules[3].when.min_balance", "no amount in every currency"),
    ({}, "consequences.rules[3].when.min_balance", "at least one currency"),
    ({"dollars": 5000}, "consequences.rules[3].when.min_balance.dollars", "currency code"),
    ({"usd": -1}, "consequences.rules[3].when.min_balance.usd", "at least 0"),
    ({"usd": "5000"}, "consequences.rules[3].when.min_balance.usd", "whole number"),
    ({"usd": 10**13}, "consequences.rules[3].when.min_balance.usd", "at most"),
    ({"usd": 5000, "USD": 6000}, "consequences.rules[3].when.min_balance.USD", "twice"),
])
def test_one_number_for_every_currency_or_a_wrong_table_stops_start_up_naming_the_key(min_balance, key, problem):
    with pytest.raises(PolicyError) as err:
        parse_policy(with_rule({"min_days": 3, "min_balance": min_balance}))
    assert err.value.key == key and problem in err.value.problem


def test_a_rule_whose_every_balance_a_more_severe_one_meets_first_is_refused():
    """limited from day 14 on $50 or 50 euros matches every invoice a restrict_premium rule from day
    20 on $60 does (tried first, it always wins); one that names the yen too still applies to yen."""
    data = default_data()
    rules = data["consequences"]["rules"]
    assert rules[2] == {"level": "limited", "when": {"min_days": 14}}
    rules[2]["when"]["min_balance"] = {"usd": 5000, "eur": 5000}
    rules.insert(3, {"level": "restrict_premium", "when": {"min_days": 20, "min_balance": {"usd": 6000}}})
    with pytest.raises(PolicyError) as err:
        parse_policy(data)
    assert err.value.key == "consequences.rules[3]" and "can never match" in err.value.problem
    for applies in ({"usd": 6000, "jpy": 9000}, {"usd": 4000}):  # yen it does not name; a smaller amount
        rules[3]["when"]["min_balance"] = applies
        parse_policy(data)
    del rules[3]["when"]["min_balance"]  # any balance, in any currency
    parse_policy(data)
