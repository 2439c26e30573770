"""HISTORY_RETENTION_DAYS: a whole number of days in range, and no shorter than the rollout gate's
health window in the policy file (refused at start: by the settings, by make_celery, by `dunning run`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import ConfigError, Settings
from app.history.prune import check_retention
from app.launcher import check_settings
from app.policy_file import DEFAULT_POLICY, load_policy
from tasks.factory import make_celery

DB = "postgresql://nobody@127.0.0.1/x"


def settings(**env: str) -> Settings:
    return Settings.from_env({"DATABASE_URL": DB, **env})


def policy_file(tmp_path: Path, window_hours: int) -> str:
    path = tmp_path / "policy.toml"
    text = DEFAULT_POLICY.read_text(encoding="utf-8")
    assert "health_window_hours = 24" in text
    path.write_text(text.replace("health_window_hours = 24", f"health_window_hours = {window_hours}"))
    return str(path)


def test_the_retention_is_90_days_unless_set():
    assert settings().history_retention_days == 90
    assert settings(HISTORY_RETENTION_DAYS="").history_retention_days == 90
    assert settings(HISTORY_RETENTION_DAYS=" 30 ").history_retention_days == 30


@pytest.mark.parametrize("value", ["ninety", "1.5", "90d", "30 days"])
def test_a_retention_that_is_not_a_whole_number_is_refused(value: str):
    with pytest.raises(ConfigError) as err:
        settings(HISTORY_RETENTION_DAYS=value)
    assert str(err.value) == f"HISTORY_RETENTION_DAYS must be a whole number of days, got {value!r}"


@pytest.mark.parametrize("value", ["0", "-7", "36501"])
def test_a_retention_out_of_range_is_refused(value: str):
    with pytest.raises(ConfigError) as err:
        settings(HISTORY_RETENTION_DAYS=value)
    assert str(err.value) == f"HISTORY_RETENTION_DAYS must be from 1 to 36500 days, got {int(value)}"


def test_a_retention_shorter_than_the_gates_health_window_is_refused(tmp_path: Path):
    policy = load_policy(policy_file(tmp_path, 1000))  # 41.7 days
    with pytest.raises(ConfigError) as err:
        check_retention(41, policy)
    assert str(err.value) == (
        "HISTORY_RETENTION_DAYS is 41, shorter than the rollout gate's health window in the policy file "
        "(rollout.health_window_hours = 1000, 41.7 days): the gate counts the sweep errors, drift records and "
        "sweeps of that window; set HISTORY_RETENTION_DAYS to at least 42")
    check_retention(42, policy)
    check_retention(1, load_policy())  # the default window: 24 hours


def test_workers_beat_and_the_web_refuse_to_start_with_it(tmp_path: Path):
    short = settings(HISTORY_RETENTION_DAYS="2", DUNNING_POLICY=policy_file(tmp_path, 72))
    with pytest.raises(ConfigError, match=r"HISTORY_RETENTION_DAYS is 2, .* at least 3"):
        make_celery(short)
    assert make_celery(short.with_overrides(history_retention_days=3)) is not None


def test_dunning_run_refuses_it_before_starting_anything(tmp_path: Path):
    env = {"HISTORY_RETENTION_DAYS": "2", "DUNNING_POLICY": policy_file(tmp_path, 72)}
    with pytest.raises(ConfigError, match="at least 3"):
        check_settings(env)
    with pytest.raises(ConfigError, match="must be a whole number of days"):
        check_settings({"HISTORY_RETENTION_DAYS": "two"})
    check_settings({**env, "HISTORY_RETENTION_DAYS": "3"})
