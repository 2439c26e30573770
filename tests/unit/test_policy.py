import os
import tomllib
from pathlib import Path

import pytest

from app.domain.policy import (
    HARD_CAP_ATTEMPTS_PER_INVOICE,
    HARD_CAP_ATTEMPTS_PER_METHOD_30D,
    PolicyError,
    parse_policy,
)
from app.domain.state import Level
from app.policy_file import DEFAULT_POLICY, PolicyFileError, load_policy


def default_data() -> dict:
    return tomllib.loads(DEFAULT_POLICY.read_text())


def test_default_policy_loads_with_the_design_numbers():
    policy = load_policy()
    assert policy.transient_schedule_days == (1, 3, 5, 7, 10, 14)
    assert policy.guard_window_minutes == 30
    assert policy.rules[0].level == Level.SUSPENDED
    assert policy.tier("prod_premium") == "premium" and policy.tier("prod_never_heard_of") == "core"
    assert policy.extra["rollout"]["soak_hours"] == 24


def test_the_hard_caps_are_the_defaults_and_a_file_cannot_lift_them():
    """A cap above the card networks' is refused at start-up (README: a wrong value stops start-up),
    not loaded and quietly reduced."""
    policy = parse_policy(default_data())
    assert policy.attempts_per_invoice == HARD_CAP_ATTEMPTS_PER_INVOICE == 8
    assert policy.attempts_per_method_30d == HARD_CAP_ATTEMPTS_PER_METHOD_30D == 15
    for key, value in (("max_attempts_per_invoice", 100), ("max_attempts_per_method_30d", 1000),
                       ("max_attempts_per_invoice", 9), ("max_attempts_per_method_30d", 16)):
        data = default_data()
        data["retry"][key] = value
        with pytest.raises(PolicyError) as err:
            parse_policy(data)
        assert err.value.key == f"retry.{key}" and "at most" in err.value.problem and "card networks" in str(err.value)
    data = default_data()
    data["retry"].update(max_attempts_per_invoice=3, max_attempts_per_method_30d=10)  # lower is the file's choice
    assert parse_policy(data).attempts_per_invoice == 3 and parse_policy(data).attempts_per_method_30d == 10


@pytest.mark.parametrize("when", [{}, {"min_days": 0}, {"min_days": 400}, {"failure_classes": ["permanent"]},
                                  {"retries_exhausted": False, "min_days": 30},
                                  {"marked_uncollectible": False}])
def test_a_suspended_rule_needs_exhausted_retries_or_an_uncollectible_invoice(when):
    """Suspended is bad debt (the subscription is cancelled): a rule that makes every unpaid account
    bad debt, or one that merely waits long enough, is refused."""
    data = default_data()
    data["consequences"]["rules"].insert(0, {"level": "suspended", "when": when})
    with pytest.raises(PolicyError) as err:
        parse_policy(data)
    assert err.value.key == "consequences.rules[0].when"
    assert "retries_exhausted" in err.value.problem and "marked_uncollectible" in err.value.problem


TOO_BIG = [
    # date arithmetic past year 9999, SQL integers out of range: refused at start-up, naming the key
    (lambda d: d["guard"].update(window_minutes=99999999999), "guard.window_minutes", "at most 10080"),
    (lambda d: d["guard"].update(window_minutes=10081), "guard.window_minutes", "at most 10080"),
    (lambda d: d["consequences"]["rules"][2]["when"].update(min_days=10**12), "consequences.rules[2].when.min_days",
     "at most 3650"),
    (lambda d: d["consequences"]["rules"][2]["when"].update(min_attempts=10**9),
     "consequences.rules[2].when.min_attempts", "at most"),
    (lambda d: d["consequences"]["rules"][2]["when"].update(min_balance={"usd": 2**63 - 1}),
     "consequences.rules[2].when.min_balance.usd", "at most"),
    (lambda d: d["consequences"].update(small_balance_threshold=2**63 - 1), "consequences.small_balance_threshold",
     "at most"),
]


@pytest.mark.parametrize(("mutate", "key", "problem"), TOO_BIG)
def test_every_number_has_an_upper_bound(mutate, key, problem):
    data = default_data()
    mutate(data)
    with pytest.raises(PolicyError) as err:
        parse_policy(data)
    assert err.value.key == key and problem in err.value.problem


def test_the_bounds_admit_the_largest_sensible_values():
    data = default_data()
    data["guard"]["window_minutes"] = 10080
    data["consequences"]["rules"][2]["when"]["min_days"] = 3650
    data["consequences"]["small_balance_threshold"] = 10**12
    policy = parse_policy(data)
    assert policy.guard_window_minutes == 10080 and policy.rules[2].min_days == 3650


@pytest.mark.parametrize(
    ("mutate", "key", "problem"),
    [
        (lambda d: d.pop("version"), "version", "non-empty"),
        # TOML's "\u0000": stored with every decision, where PostgreSQL text holds no NUL (every
        # recompute failed with psycopg2's ValueError)
        (lambda d: d.update(version="2026-11-21\u0000"), "version", "NUL"),
        (lambda d: d["retry"].update(transient_schedule_days=[3, 1]), "retry.transient_schedule_days", "increasing"),
        (lambda d: d["retry"].update(transient_schedule_days=[1, "x"]), "retry.transient_schedule_days", "from 1"),
        # a day no date arithmetic reaches (it broke every recompute of an account in dunning)
        (lambda d: d["retry"].update(transient_schedule_days=[1, 3, 5_000_000]), "retry.transient_schedule_days",
         "to 365"),
        # typos: ignored, they left a default in force; a rule's "wen" matched every account
        (lambda d: d["consequences"]["rules"][1].update(wen=d["consequences"]["rules"][1].pop("when")),
         "consequences.rules[1]", "unknown key(s) ['wen']"),
        (lambda d: d.update(retyr=d.pop("retry")), "policy file", "unknown key(s) ['retyr']"),
        (lambda d: d["retry"].update(transient_schedule_day=[2]), "retry", "unknown key(s)"),
        (lambda d: d["guard"].update(window_minute=5), "guard", "unknown key(s)"),
        (lambda d: d["retry"].update(unknown_schedule_days=list(range(1, 10))), "retry.unknown_schedule_days", "cap"),
        (lambda d: d["retry"].update(max_attempts_per_invoice="8"), "retry.max_attempts_per_invoice", "whole"),
        (lambda d: d["consequences"]["rules"][0].update(level="banned"), "consequences.rules[0].level", "one of"),
        (lambda d: d["consequences"]["rules"][1]["when"].update(min_dayz=3), "consequences.rules[1].when", "unknown"),
        (lambda d: d["consequences"]["rules"].reverse(), "consequences.rules", "most severe"),
        (lambda d: d["consequences"].update(upgrade_max_level="suspended"), "consequences.upgrade_max_level", "below"),
        (lambda d: d["consequences"].update(upgrade_max_level="none"), "consequences.upgrade_max_level", "not none"),
        (lambda d: d["products"]["catalog"].update(prod_x="gold"), "products.catalog.prod_x", "core"),
        (lambda d: d["guard"].update(window_minutes=0), "guard.window_minutes", "at least 1"),
    ],
)
def test_invalid_policy_names_the_key_and_the_problem(mutate, key, problem):
    data = default_data()
    mutate(data)
    with pytest.raises(ValueError) as err:
        parse_policy(data)
    assert f"policy key '{key}'" in str(err.value)
    assert problem in str(err.value)


def test_policy_file_errors_name_the_file(tmp_path: Path):
    with pytest.raises(PolicyFileError, match="does not exist"):
        load_policy(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("version = ")
    with pytest.raises(PolicyFileError, match="not valid TOML"):
        load_policy(broken)
    bad = tmp_path / "bad.toml"
    bad.write_text(DEFAULT_POLICY.read_text().replace("window_minutes = 30", "window_minutes = -1"))
    with pytest.raises(PolicyFileError, match=r"bad.toml: policy key 'guard.window_minutes'"):
        load_policy(bad)
    # the [rollout] section is checked at start-up too, not first by the gate task minutes later
    rollout = tmp_path / "rollout.toml"
    text = DEFAULT_POLICY.read_text()
    assert "soak_hours = 24" in text
    rollout.write_text(text.replace("soak_hours = 24", 'soak_hours = "abc"'))
    with pytest.raises(PolicyFileError, match=r"rollout.toml: policy key 'rollout.soak_hours'"):
        load_policy(rollout)


def test_a_policy_file_that_cannot_be_read_names_dunning_policy_and_the_path(tmp_path: Path):
    """A directory, bytes that are not UTF-8, a file without read permission: a PolicyFileError
    naming the variable and the path (the CLI prints it), not a bare OSError or UnicodeDecodeError."""
    binary = tmp_path / "latin1.toml"
    binary.write_bytes(DEFAULT_POLICY.read_bytes().replace(b"# The default", b"# L\xe9 default"))
    unreadable = tmp_path / "secret.toml"
    unreadable.write_text(DEFAULT_POLICY.read_text())
    unreadable.chmod(0)
    cases = [(tmp_path, "Is a directory"), (binary, "can't decode")]
    if os.geteuid() != 0:  # root reads it anyway
        cases.append((unreadable, "Permission denied"))
    for path, reason in cases:
        with pytest.raises(PolicyFileError) as err:
            load_policy(path)
        assert f"policy file {path} (DUNNING_POLICY) cannot be read" in str(err.value)
        assert reason in str(err.value)


def test_app_start_fails_on_an_invalid_policy(tmp_path: Path):
    from app import create_app
    from app.config import Settings

    bad = tmp_path / "bad.toml"
    bad.write_text(DEFAULT_POLICY.read_text().replace('level = "limited"', 'level = "jail"'))
    settings = Settings(database_url="postgresql+psycopg2://nobody@127.0.0.1:1/x", policy_path=str(bad))
    with pytest.raises(PolicyFileError, match=r"consequences.rules\[2\].level"):
        create_app(settings)
