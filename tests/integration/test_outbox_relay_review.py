"""The outbox relay against a fake Account Management that throttles or holds its answers open:
Retry-After is honoured, and no answer, however it trickles in, holds the relay past its limit."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from app.domain.events import EntitlementsChanged
from app.outbox.relay import relay
from tests.conftest import wait_for
from tests.integration.test_outbox_relay import LATER, outbox, write_events


@pytest.mark.parametrize("status, retry_after", [(429, "120"), (503, "date")])
def test_retry_after_is_honoured_and_the_pass_asks_nothing_more_of_account_management(
        accounts, engine, fake_am, status, retry_after):
    """Account Management throttles the relay draining a backlog (429) or says when it will be back
    (503): the row waits at least what it asked, not 1 to 2 s, and the pass stops asking it for
    the other accounts; the next pass delivers them."""
    throttled, _ = accounts.create()
    other, _ = accounts.create()
    write_events(engine, throttled, 1, [EntitlementsChanged(entitlements={"v": 1})])  # first in line
    write_events(engine, other, 1, [EntitlementsChanged(entitlements={"v": 1})])
    now = datetime.now(UTC).replace(microsecond=0) + LATER
    wait = format_datetime(now + timedelta(seconds=120), usegmt=True) if retry_after == "date" else retry_after
    fake_am.answer_raw(throttled, status, b"slow down", headers={"Retry-After": wait})

    # One account at a time: a pass relaying several at once stops taking accounts and rows likewise,
    # its calls under way answered (test_outbox_relay_concurrent.py).
    report = relay(engine, fake_am.url, now=now, concurrency=1)
    assert (report.delivered, report.failed) == (0, 1)
    (row,) = outbox(engine, throttled)
    assert row["delivered_at"] is None and row["attempts"] == 1 and f"HTTP {status}" in row["last_error"]
    assert row["next_attempt_at"] >= now + timedelta(seconds=120)
    assert fake_am.entitlements(other) == []  # not asked in the pass it said to wait

    assert relay(engine, fake_am.url, now=now).delivered == 1  # the throttled one waits; the rest goes
    assert [r.body["dunning_version"] for r in fake_am.entitlements(other)] == [1]


def test_an_answer_that_trickles_in_is_cut_at_the_calls_limit_and_the_pass_goes_on(accounts, engine, fake_am):
    """A proxy before Account Management holds an answer open, a byte every half second: each read
    is within the read timeout, so without a limit on the whole call the relay waited on it for
    hours (its task killed at the time limit, the same account first in line again), and no other
    account was ever delivered. The call is cut, recorded as a failure that backs off (never as
    delivered: the 200 was never complete), and the pass goes on."""
    held, _ = accounts.create()
    other, _ = accounts.create()
    write_events(engine, held, 1, [EntitlementsChanged(entitlements={"v": 1})])  # first in line
    write_events(engine, other, 1, [EntitlementsChanged(entitlements={"v": 1})])
    fake_am.trickle(held)

    reports: list[Any] = []
    # The read timeout is for the other account's answer, which must come: 3 s, not 1 s, so that a
    # loaded machine does not fail it. The trickle's bytes (every 0.5 s) come well within it.
    relaying = threading.Thread(target=lambda: reports.append(relay(engine, fake_am.url, timeout=(1.0, 3.0))),
                                daemon=True)
    relaying.start()
    wait_for(lambda: not relaying.is_alive(), message="the relay pass to end")
    assert (reports[0].delivered, reports[0].failed) == (1, 1)
    (row,) = outbox(engine, held)
    assert row["delivered_at"] is None and row["attempts"] == 1
    assert "Timeout: no complete answer from Account Management within 4 s" in row["last_error"]  # the call's limit
    assert [r.body["dunning_version"] for r in fake_am.entitlements(other)] == [1]


def test_a_pass_started_while_another_runs_leaves_the_work_to_it(accounts, engine, fake_am):
    """Beat sends a pass every 5 s and a pass may take its 20 s budget (and a call more) when
    Account Management is slow: each pass that started while others ran took another worker
    process and waited on Account Management too, up to five at once, so a slow Account Management
    filled the worker pool and recomputes waited (DESIGN 5: it never blocks a recompute). One pass
    runs at a time; one that finds another running leaves the work to it."""
    held, _ = accounts.create()
    other, _ = accounts.create()
    write_events(engine, held, 1, [EntitlementsChanged(entitlements={"v": 1})])  # first in line
    write_events(engine, other, 1, [EntitlementsChanged(entitlements={"v": 1})])
    asked, release = threading.Event(), threading.Event()

    def slow_for_held(request: Any) -> None:
        if request.account_id == held:
            asked.set()
            release.wait(20)

    fake_am.before_answer = slow_for_held
    reports: list[Any] = []
    # One account at a time: the first pass does not send the other account while it waits.
    first = threading.Thread(target=lambda: reports.append(relay(engine, fake_am.url, timeout=(1.0, 30.0),
                                                                 concurrency=1)),
                             daemon=True)
    first.start()
    try:
        wait_for(asked.is_set, message="the first pass to wait on Account Management")
        second = relay(engine, fake_am.url)
        assert (second.accounts, second.delivered, second.failed) == (0, 0, 0)
        assert fake_am.for_account(other) == []  # not sent beside the running pass
    finally:
        release.set()
        first.join()
    assert reports[0].delivered == 2  # the running pass delivers both, in turn
    assert [len(fake_am.entitlements(account)) for account in (held, other)] == [1, 1]
