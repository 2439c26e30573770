"""DESIGN 4: an unknown failure is "treated as transient with a smaller budget". A policy file whose
unknown schedule has as many retries as the transient one (or more) retries a decline nobody can read
as hard as one known to pass, and more often than card networks like: refused at start-up."""

from __future__ import annotations

import tomllib

import pytest

from app.domain.policy import PolicyError, parse_policy
from app.policy_file import DEFAULT_POLICY


def with_schedules(transient: list[int], unknown: list[int]) -> dict:
    data = tomllib.loads(DEFAULT_POLICY.read_text())
    data["retry"].update(transient_schedule_days=transient, unknown_schedule_days=unknown)
    return data


@pytest.mark.parametrize(("transient", "unknown"), [
    ([1, 3, 5], [2, 5, 9]),  # as many
    ([1, 3], [1, 2, 3, 4, 5]),  # more
])
def test_an_unknown_schedule_not_smaller_than_the_transient_one_stops_start_up(transient, unknown):
    with pytest.raises(PolicyError) as err:
        parse_policy(with_schedules(transient, unknown))
    assert err.value.key == "retry.unknown_schedule_days"
    assert "fewer retries than retry.transient_schedule_days" in err.value.problem


@pytest.mark.parametrize(("transient", "unknown"), [([1, 3, 5, 7, 10, 14], [2, 5, 9]), ([1, 3], [2]), ([1], []),
                                                     ([], [])])
def test_a_smaller_unknown_schedule_or_none_at_all_is_accepted(transient, unknown):
    pol = parse_policy(with_schedules(transient, unknown))
    assert (list(pol.transient_schedule_days), list(pol.unknown_schedule_days)) == (transient, unknown)
