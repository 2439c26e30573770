"""tests.conftest.wait_for keeps its timeout by the real clock: inside freeze_time (no tick),
time.monotonic stands still, and a wait for something that never comes polled for ever, a CI run
hanging instead of failing."""

from __future__ import annotations

import pytest
from freezegun import freeze_time

from tests.conftest import wait_for

INTERVAL = 0.01
TIMEOUT = 0.2
# Far more polls than the timeout allows (about TIMEOUT / INTERVAL): a helper that ignores its
# timeout is stopped here, and fails, rather than hanging the run.
TOO_MANY_POLLS = 1000


def test_a_wait_inside_frozen_time_still_times_out():
    polls = 0

    def never() -> bool:
        nonlocal polls
        polls += 1
        if polls > TOO_MANY_POLLS:
            raise RuntimeError(f"still polling after {polls} polls: the {TIMEOUT} s timeout was never reached")
        return False

    with freeze_time("2026-01-01 12:00:00"), pytest.raises(AssertionError, match="timed out after"):
        wait_for(never, timeout=TIMEOUT, interval=INTERVAL, message="nothing")
    assert polls <= TOO_MANY_POLLS


def test_frozen_time_moved_on_by_the_test_does_not_end_a_wait_early():
    """A test that moves frozen time forward (clock.tick, move_to, a fake's hook) while a wait runs must
    not make the wait give up at once: the wait is for something that will come."""
    with freeze_time("2026-01-01 12:00:00") as clock:
        polls = 0

        def comes_on_the_third_poll() -> bool:
            nonlocal polls
            polls += 1
            clock.tick(3600)  # an hour of frozen time per poll, far past the timeout
            return polls >= 3

        assert wait_for(comes_on_the_third_poll, timeout=TIMEOUT, interval=INTERVAL, message="the third poll")
