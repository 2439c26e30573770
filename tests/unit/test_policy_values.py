"""A policy value of the wrong TOML type (an array or a table where a name is expected) is refused
naming its key, as every other wrong value is: never a TypeError traceback at start-up."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from app.domain.policy import PolicyError, parse_policy
from app.policy_file import DEFAULT_POLICY, PolicyFileError, load_policy


def default_data() -> dict:
    return tomllib.loads(DEFAULT_POLICY.read_text())


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda d: d["consequences"]["rules"][0].update(level=["suspended"]), "consequences.rules[0].level"),
        (lambda d: d["consequences"]["rules"][0].update(level={"name": "suspended"}), "consequences.rules[0].level"),
        (lambda d: d["consequences"]["rules"][4]["when"].update(failure_classes=[["permanent"]]),
         "consequences.rules[4].when.failure_classes"),
        (lambda d: d["consequences"]["rules"][4]["when"].update(failure_classes=[{"class": "permanent"}]),
         "consequences.rules[4].when.failure_classes"),
        (lambda d: d["consequences"].update(upgrade_max_level=["notice"]), "consequences.upgrade_max_level"),
        (lambda d: d["consequences"].update(upgrade_max_level={"level": "notice"}), "consequences.upgrade_max_level"),
    ],
)
def test_a_value_of_the_wrong_type_names_its_key(mutate, key):
    data = default_data()
    mutate(data)
    with pytest.raises(PolicyError) as err:
        parse_policy(data)
    assert err.value.key == key


def test_a_policy_file_with_an_array_for_a_level_stops_start_up_naming_the_key(tmp_path: Path):
    text = DEFAULT_POLICY.read_text().replace('level = "suspended"', 'level = ["suspended"]', 1)
    file = tmp_path / "policy.toml"
    file.write_text(text)
    with pytest.raises(PolicyFileError, match=r"consequences\.rules\[0\]\.level"):
        load_policy(file)
