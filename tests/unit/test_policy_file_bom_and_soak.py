"""Two ways a policy file went wrong at start-up or after it.

A file saved with a UTF-8 byte-order mark (Notepad and other Windows editors write one) was refused
as "Invalid statement (at line 1, column 1)": TOML read the mark as a stray character, and nothing
in the file as shown was wrong. It is read as the same file without it.

``[rollout] soak_hours = 0`` was accepted: the gate then widened the rollout at every check that
followed a completed sweep, off -> 100% in about as many sweeps as stages (DESIGN 6: a stage advances
only after its soak time with health inside limits, and a reverted remediation shows only at a later
sweep). A soak under an hour stops start-up, naming the key.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from app.domain.policy import PolicyError
from app.domain.rollout import Health, RolloutPolicy, RolloutStatus, evaluate_gate, health_since, rollout_policy
from app.policy_file import DEFAULT_POLICY, PolicyFileError, load_policy

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def test_a_policy_file_saved_with_a_byte_order_mark_is_read_as_without_it(tmp_path: Path):
    with_bom = tmp_path / "policy.toml"
    with_bom.write_bytes(b"\xef\xbb\xbf" + DEFAULT_POLICY.read_bytes())
    assert load_policy(with_bom) == load_policy(DEFAULT_POLICY)


def test_a_byte_order_mark_inside_the_file_is_still_refused(tmp_path: Path):
    """Only a leading mark is an encoding's signature; one further in is a stray character, as before."""
    inside = tmp_path / "policy.toml"
    inside.write_bytes(DEFAULT_POLICY.read_bytes().replace(b"[guard]", b"\xef\xbb\xbf[guard]"))
    with pytest.raises(PolicyFileError, match="not valid TOML"):
        load_policy(inside)


@pytest.mark.parametrize("soak", [0, 0.0, 0.25, 0.99])
def test_a_soak_under_an_hour_stops_start_up_naming_the_key(soak: float):
    with pytest.raises(PolicyError) as info:
        rollout_policy({"rollout": {"soak_hours": soak}})
    assert info.value.key == "rollout.soak_hours"
    assert "must be at least 1 hour" in info.value.problem


def test_a_soak_of_zero_in_the_file_stops_start_up(tmp_path: Path):
    bad = tmp_path / "policy.toml"
    text = DEFAULT_POLICY.read_text()
    assert "soak_hours = 24" in text
    bad.write_text(text.replace("soak_hours = 24", "soak_hours = 0"))
    with pytest.raises(PolicyFileError, match=r"policy key 'rollout.soak_hours': must be at least 1 hour, got 0"):
        load_policy(bad)


def test_an_hour_is_the_shortest_soak_and_the_gate_waits_it_out():
    limits = rollout_policy({"rollout": {"soak_hours": 1}})
    healthy = Health(remediations=3, reverted=0, errors=0, sweeps=2)
    entered = RolloutStatus(stage="5", held=False, stage_entered_at=NOW - timedelta(minutes=30), revision=4)
    assert evaluate_gate(entered, healthy, limits, NOW).action == "hold"
    assert evaluate_gate(entered, healthy, limits, NOW + timedelta(minutes=30)).action == "advance"


@pytest.mark.parametrize("window", [0.01, 0.25, 0.99])
def test_a_health_window_under_an_hour_stops_start_up_naming_the_key(window: float):
    """Health counts the remediations inside the window, and a revert is found by a later sweep (every
    15 minutes): with a window of minutes the remediation had left it by then, the revert was never
    counted and the gate never stepped back on reverts (nor did a sweep longer than the window ever
    count as a complete one). 0 was already refused."""
    with pytest.raises(PolicyError) as info:
        rollout_policy({"rollout": {"health_window_hours": window}})
    assert info.value.key == "rollout.health_window_hours"
    assert "must be at least 1 hour" in info.value.problem


def test_an_hour_of_health_window_still_holds_a_remediation_when_the_next_sweep_finds_it_reverted():
    remediated, found_again = NOW - timedelta(minutes=20), NOW  # the sweep after the next
    stage = RolloutStatus(stage="10", held=False, stage_entered_at=NOW - timedelta(hours=5), revision=7)
    assert health_since(stage, rollout_policy({"rollout": {"health_window_hours": 1}}), found_again) <= remediated
    assert health_since(stage, RolloutPolicy(health_window_hours=0.1), found_again) > remediated  # was accepted
