"""Level rules that pass the old checks but break DESIGN 4's graduated levels: a rule no invoice can
ever reach first (a less severe level's threshold after a more severe one's: restrict_premium from
day 20 under limited from day 14 skips restrict_premium for everyone), a rule listing no failure
class (it matches nothing), a rule at level none (none is "nothing unpaid": an account that owes
would sit at none, past due and nobody told). Each stops start-up naming the rule and the problem."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from app.domain.policy import PolicyError, parse_policy
from app.domain.state import Level
from app.policy_file import DEFAULT_POLICY, PolicyFileError, load_policy


def default_data() -> dict:
    return tomllib.loads(DEFAULT_POLICY.read_text())


def rules(data: dict) -> list[dict]:
    return data["consequences"]["rules"]


def test_the_default_rules_are_each_reachable():
    assert [r["level"] for r in rules(default_data())] == ["suspended", "suspended", "limited", "restrict_premium",
                                                           "restrict_premium", "notice"]
    assert len(parse_policy(default_data()).rules) == 6


@pytest.mark.parametrize(
    ("mutate", "key", "shadowed_by"),
    [
        # restrict_premium from day 20 under limited from day 14: nobody is ever restricted, the
        # account goes from notice straight to limited (read-only) on day 14
        (lambda d: rules(d)[3]["when"].update(min_days=20), "consequences.rules[3]", "consequences.rules[2]"),
        # as late as the more severe level: the same
        (lambda d: rules(d)[3]["when"].update(min_days=14), "consequences.rules[3]", "consequences.rules[2]"),
        # limited with no condition at all: every unpaid invoice is limited, restrict_premium and notice never
        (lambda d: rules(d)[2].update(when={}), "consequences.rules[3]", "consequences.rules[2]"),
        # the permanent/action_required rule, later than the plain one of a more severe level
        (lambda d: rules(d)[4]["when"].update(min_days=15), "consequences.rules[4]", "consequences.rules[2]"),
        # notice from day 30 under restrict_premium from day 7
        # (the first rule that always matches first is named)
        (lambda d: rules(d)[5].update(when={"min_days": 30}), "consequences.rules[5]", "consequences.rules[2]"),
        # a condition that always holds is no condition: limited from day 0 is limited at once
        (lambda d: rules(d)[2].update(when={"min_days": 0}), "consequences.rules[3]", "consequences.rules[2]"),
    ],
)
def test_a_rule_a_more_severe_one_always_matches_first_is_refused(mutate, key, shadowed_by):
    data = default_data()
    mutate(data)
    with pytest.raises(PolicyError) as err:
        parse_policy(data)
    assert err.value.key == key
    assert "can never match" in err.value.problem and shadowed_by in err.value.problem


@pytest.mark.parametrize(
    "mutate",
    [
        # a stricter condition on the more severe rule: the later one still matches what it does not
        lambda d: rules(d)[2]["when"].update(failure_classes=["permanent"]),
        lambda d: rules(d)[2]["when"].update(min_attempts=3),
        lambda d: rules(d)[2]["when"].update(min_balance={"usd": 10_000}),
        # the same level twice: whichever matches, the level is the same
        lambda d: rules(d).insert(4, {"level": "restrict_premium", "when": {"min_days": 9}}),
        # under a suspended rule: the payment-flow guard holds a suspended invoice at its first rule
        # below suspended, so a later rule that reads retries_exhausted is still used
        lambda d: rules(d).insert(2, {"level": "limited", "when": {"retries_exhausted": True, "min_days": 30}}),
        # condition values that always hold count as no condition, and do not make a rule stricter
        lambda d: rules(d)[5].update(when={"min_days": 0}),
    ],
)
def test_a_rule_that_can_match_first_is_accepted(mutate):
    data = default_data()
    mutate(data)
    parse_policy(data)


def test_a_rule_listing_no_failure_class_is_refused():
    data = default_data()
    rules(data)[4]["when"]["failure_classes"] = []
    with pytest.raises(PolicyError) as err:
        parse_policy(data)
    assert err.value.key == "consequences.rules[4].when.failure_classes"
    assert "at least one" in err.value.problem


def test_a_rule_at_level_none_is_refused():
    data = default_data()
    rules(data)[5]["level"] = Level.NONE.value
    with pytest.raises(PolicyError) as err:
        parse_policy(data)
    assert err.value.key == "consequences.rules[5].level"
    assert "nothing unpaid" in err.value.problem


def test_a_policy_file_with_levels_out_of_order_stops_start_up_naming_the_rule(tmp_path: Path):
    text = DEFAULT_POLICY.read_text()
    assert 'level = "restrict_premium"\nwhen = { min_days = 7 }' in text
    file = tmp_path / "policy.toml"
    file.write_text(text.replace('level = "restrict_premium"\nwhen = { min_days = 7 }',
                                 'level = "restrict_premium"\nwhen = { min_days = 20 }'))
    with pytest.raises(PolicyFileError, match=r"policy key 'consequences\.rules\[3\]': can never match"):
        load_policy(file)
