"""Staged rollout: stable buckets, nested stages, the gate on generated health data."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.domain.policy import PolicyError
from app.domain.rollout import (
    STAGES,
    Health,
    RolloutPolicy,
    RolloutStatus,
    bucket,
    evaluate_gate,
    health_since,
    in_stage,
    next_stage,
    previous_stage,
    rollout_policy,
)
from app.policy_file import load_policy

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
POLICY = RolloutPolicy(soak_hours=24, max_reverted_ratio=0.02, max_errors=5, health_window_hours=24)
PERCENT_STAGES = [s for s in STAGES if s.isdigit()]


def test_bucket_is_pinned_sha256_not_pythons_salted_hash():
    # Pinned: changing the hash would move accounts between stages mid-rollout.
    assert bucket("acct_1") == 6834
    assert bucket("acct_2") == 7991
    assert bucket("") == 1652
    assert bucket("ünïcode-äccount") == bucket("ünïcode-äccount")


@given(st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=50), st.sets(st.text(max_size=10), max_size=5))
@settings(max_examples=200)
def test_stages_are_nested_for_any_ids(ids, named):
    for account in ids:
        member = [in_stage(account, stage, named) for stage in STAGES]
        # once in, in every larger stage
        assert member == sorted(member), (account, member)
        assert member[0] is False  # off: nobody
        assert member[-1] is True  # 100%: everybody
        assert member[1] == (account in named)  # named stage: exactly the named accounts
        if account in named:
            assert all(member[1:])


def test_percentage_stages_take_about_their_share():
    ids = [f"acct_{n}" for n in range(20_000)]
    for stage in PERCENT_STAGES:
        share = sum(in_stage(a, stage, ()) for a in ids) / len(ids)
        assert abs(share - int(stage) / 100) < 0.01, (stage, share)


def test_stage_neighbours():
    assert next_stage("off") == "named" and next_stage("50") == "100" and next_stage("100") is None
    assert previous_stage("named") == "off" and previous_stage("5") == "named" and previous_stage("off") is None
    with pytest.raises(ValueError, match="unknown rollout stage"):
        in_stage("a", "7", ())


def test_rollout_policy_from_the_default_file_and_errors_name_the_key():
    rp = rollout_policy(load_policy().extra)
    assert rp == RolloutPolicy(soak_hours=24, max_reverted_ratio=0.02, max_errors=5, health_window_hours=24)
    assert rollout_policy({}) == RolloutPolicy()
    for section, key in (({"soak_hours": "a day"}, "rollout.soak_hours"),
                         ({"max_reverted_ratio": 1.5}, "rollout.max_reverted_ratio"),
                         ({"max_errors": 2.5}, "rollout.max_errors"),
                         ({"max_errors": -1}, "rollout.max_errors"),
                         ({"health_window_hours": 0}, "rollout.health_window_hours"),
                         ({"soak_hour": 1}, "rollout")):
        with pytest.raises(PolicyError) as info:
            rollout_policy({"rollout": section})
        assert info.value.key == key
    with pytest.raises(PolicyError, match="must be a table"):
        rollout_policy({"rollout": 3})


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("max_reverted_ratio", float("nan"), "finite"),  # nan > limit is never true: the gate would never roll back
    ("soak_hours", float("nan"), "finite"),
    ("soak_hours", float("inf"), "finite"),
    ("soak_hours", 1e300, "at most 8760"),
    ("soak_hours", 8761, "at most 8760"),
    ("health_window_hours", float("inf"), "finite"),
    ("health_window_hours", -float("inf"), "finite"),
    ("health_window_hours", 1e12, "at most 8760"),
    ("max_errors", 10**12, "at most"),
    ("min_remediations", 2**63 - 1, "at most"),
])
def test_rollout_numbers_are_finite_and_bounded(key, value, problem):
    """TOML has nan and inf. Loaded, they broke the gate later (OverflowError in timedelta, a gate that
    never rolls back): refused at start-up, naming the key."""
    with pytest.raises(PolicyError) as info:
        rollout_policy({"rollout": {key: value}})
    assert info.value.key == f"rollout.{key}" and problem in info.value.problem


def test_rollout_nan_in_the_file_stops_start_up(tmp_path):
    from app.policy_file import DEFAULT_POLICY, PolicyFileError

    for line in ("max_reverted_ratio = nan", "soak_hours = inf", "health_window_hours = +inf"):
        key = line.split(" =")[0]
        bad = tmp_path / "policy.toml"
        bad.write_text(DEFAULT_POLICY.read_text().replace(f"{key} = ", f"{line}\n# {key} = "))
        with pytest.raises(PolicyFileError, match=f"policy key 'rollout.{key}': must be a finite number"):
            load_policy(bad)
    largest = rollout_policy({"rollout": {"soak_hours": 8760, "health_window_hours": 8760, "max_reverted_ratio": 1}})
    assert largest.soak.days == 365 and largest.health_window.days == 365


def state(stage: str, hours_in_stage: float, held: bool = False, named: tuple[str, ...] = ("acct_named",)
          ) -> RolloutStatus:
    return RolloutStatus(stage=stage, held=held, stage_entered_at=NOW - timedelta(hours=hours_in_stage),
                         named_accounts=named)


healthy = st.builds(
    lambda n, share, errors, sweeps: Health(remediations=n, reverted=int(n * share), errors=errors, sweeps=sweeps),
    st.integers(0, 100_000), st.floats(0, 0.02), st.integers(0, 5), st.integers(1, 100),
)


@given(st.sampled_from(STAGES[1:-1]), st.floats(24, 24 * 30), healthy)
def test_gate_advances_after_soak_when_healthy(stage, hours, health):
    decision = evaluate_gate(state(stage, hours), health, POLICY, NOW)
    assert decision.action == "advance", decision
    assert decision.to_stage == next_stage(stage)


@given(st.sampled_from(STAGES[1:]), st.floats(0, 23.99), healthy)
def test_gate_holds_before_soak(stage, hours, health):
    decision = evaluate_gate(state(stage, hours), health, POLICY, NOW)
    assert decision.action == "hold" and "soaking" in decision.reason
    assert decision.to_stage is None


@given(st.sampled_from(STAGES[1:]), st.floats(0, 24 * 30), st.integers(1, 100_000), st.floats(0.0201, 1),
       st.integers(0, 5))
def test_gate_steps_back_when_reverted_ratio_exceeds_limit(stage, hours, n, share, errors):
    reverted = max(1, min(n, int(n * share) + 1))
    health = Health(remediations=n, reverted=reverted, errors=errors, sweeps=3)
    if health.reverted_ratio <= POLICY.max_reverted_ratio:
        return
    decision = evaluate_gate(state(stage, hours), health, POLICY, NOW)
    assert decision.action == "rollback" and decision.to_stage == previous_stage(stage)
    assert "reverted" in decision.reason


@given(st.sampled_from(STAGES[1:]), st.floats(0, 24 * 30), st.integers(6, 10_000), st.integers(0, 1000))
def test_gate_steps_back_when_errors_exceed_limit(stage, hours, errors, n):
    decision = evaluate_gate(state(stage, hours), Health(remediations=n, errors=errors, sweeps=2), POLICY, NOW)
    assert decision.action == "rollback" and decision.to_stage == previous_stage(stage)
    assert f"{errors} errors > limit 5" in decision.reason


def test_gate_does_nothing_when_off_or_healthy_at_the_top():
    bad = Health(remediations=10, reverted=10, errors=100, sweeps=1)
    assert evaluate_gate(state("off", 100), bad, POLICY, NOW).action == "none"
    assert evaluate_gate(state("off", 100, held=True), bad, POLICY, NOW).action == "none"
    assert evaluate_gate(state("100", 100), Health(sweeps=1), POLICY, NOW).action == "none"


@given(st.sampled_from(STAGES[1:]), st.floats(0, 24 * 30), st.integers(1, 1000), st.integers(0, 10_000))
def test_a_held_stage_still_steps_back_when_its_health_breaches(stage, hours, n, errors):
    """Hold stops the gate from advancing, never from stepping back (DESIGN section 6: the stage
    "halts or steps back by itself" when its limits are breached). Remediation keeps running at a
    held stage, whether an operator held it or the gate held it after a step back."""
    health = Health(remediations=n, reverted=n, errors=errors, sweeps=1)  # every remediation reverted
    decision = evaluate_gate(state(stage, hours, held=True), health, POLICY, NOW)
    assert decision.action == "rollback" and decision.to_stage == previous_stage(stage)
    assert "reverted" in decision.reason


@given(st.sampled_from(STAGES[1:]), st.floats(0, 24 * 30), healthy)
def test_a_held_stage_neither_soaks_nor_advances_while_healthy(stage, hours, health):
    """Held and within limits: nothing to do until an operator resumes, however long it soaked."""
    decision = evaluate_gate(state(stage, hours, held=True), health, POLICY, NOW)
    assert decision.action == "none" and decision.to_stage is None
    assert "held at" in decision.reason


def test_gate_holds_without_a_completed_sweep_or_enough_remediations():
    decision = evaluate_gate(state("10", 48), Health(sweeps=0), POLICY, NOW)
    assert decision.action == "hold" and "no completed sweep" in decision.reason
    strict = RolloutPolicy(min_remediations=50)
    decision = evaluate_gate(state("10", 48), Health(remediations=49, sweeps=4), strict, NOW)
    assert decision.action == "hold" and "50 needed" in decision.reason


def test_health_counts_from_the_stage_start_within_the_window():
    assert health_since(state("10", 2), POLICY, NOW) == NOW - timedelta(hours=2)
    assert health_since(state("10", 200), POLICY, NOW) == NOW - timedelta(hours=24)


@given(st.floats(24, 24 * 30), healthy)
def test_the_gate_never_widens_from_named_accounts_with_nobody_named(hours, health):
    """Named with an empty list remediates no one, as off: the gate does not start the rollout to
    5% by itself from it (from off only an operator starts it). It still steps back when breached."""
    decision = evaluate_gate(state("named", hours, named=()), health, POLICY, NOW)
    assert decision.action == "hold" and "no named accounts" in decision.reason, decision
    breached = Health(remediations=1, reverted=1, sweeps=1)
    assert evaluate_gate(state("named", hours, named=()), breached, POLICY, NOW).action == "rollback"


@given(st.floats(24, 24 * 30), healthy)
def test_the_gate_never_widens_from_named_accounts_none_of_which_exists(hours, health):
    """Named ids with no account (typos, accounts deleted) remediate no one either: held, saying which.
    One of them existing is exposure, and the gate decides as before."""
    missing = replace(state("named", hours, named=("acct_typo", "acct_gone")), missing_named=("acct_gone", "acct_typo"))
    decision = evaluate_gate(missing, health, POLICY, NOW)
    assert decision.action == "hold" and "none of the named accounts exists (acct_gone, acct_typo" in decision.reason
    one = replace(missing, named_accounts=("acct_typo", "acct_gone", "acct_real"))
    assert evaluate_gate(one, health, POLICY, NOW).action == "advance"
    breached = Health(remediations=1, reverted=1, sweeps=1)
    assert evaluate_gate(missing, breached, POLICY, NOW).action == "rollback"
