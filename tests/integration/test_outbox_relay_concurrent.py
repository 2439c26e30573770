"""A relay pass drains a backlog several accounts at a time, each account's rows still in order.

After an Account Management outage (200,000 rows over 50,000 accounts, bench/periodic.py), the one
pass running fleet-wide sent one call at a time: each account cost a round trip to Account
Management plus its own statements, and the backlog drained at about 130 rows/s (500 accounts a
pass of 15 s) whatever Account Management could take.
"""

from __future__ import annotations

import signal
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from freezegun import freeze_time
from sqlalchemy import Engine

from app.db import make_engine
from app.domain.events import DunningEntered, EntitlementsChanged
from app.outbox.relay import relay
from tests.integration.test_outbox_relay import outbox, write_events


def entitlements(level: str) -> EntitlementsChanged:
    return EntitlementsChanged(entitlements={"products": {"prod_core": level}, "plan_changes": False})


AT_ONCE = 4  # app.outbox.relay.PASS_CONCURRENCY


def test_a_pass_has_several_accounts_calls_under_way_at_once(accounts, engine, fake_am):
    """Account Management answers no call before AT_ONCE of them are under way: a pass sending one
    call at a time has its first call time out (5 s) and delivers nothing."""
    created = [accounts.create()[0] for _ in range(AT_ONCE)]
    for account in created:
        write_events(engine, account, 1, [entitlements("read_only")])
    together = threading.Barrier(AT_ONCE, timeout=30)
    fake_am.before_answer = lambda _request: together.wait()

    report = relay(engine, fake_am.url)

    assert report.failed == 0 and report.delivered == AT_ONCE
    assert sorted(r.account_id for r in fake_am.received) == sorted(created)


def test_each_account_is_relayed_whole_and_a_refused_one_stops_at_its_refusal(accounts, engine, fake_am):
    """Many accounts in one pass, each relayed once: its newest entitlements sent (the older one
    superseded), and the account Account Management refuses keeps that row, blocked, while the
    others are delivered."""
    created = [accounts.create()[0] for _ in range(12)]
    for account in created:
        write_events(engine, account, 1, [DunningEntered(unpaid_since=None, failure_class="transient"),
                                          entitlements("read_only")])
        write_events(engine, account, 2, [entitlements("revoked")])
    refused = created[5]
    fake_am.refuse(refused, 404, {"error": "unknown_account"})

    report = relay(engine, fake_am.url)

    assert report.accounts == 12 and report.failed == 1
    for account in created:
        versions = [r.body["dunning_version"] for r in fake_am.entitlements(account)]
        states = [(r["state"], r["blocked_at"] is not None) for r in outbox(engine, account)]
        if account == refused:
            assert versions == [] and states == [("delivered", False), ("superseded", False), ("pending", True)]
        else:
            assert versions == [2] and states == [("delivered", False), ("superseded", False), ("delivered", False)]


def test_a_pass_throttled_takes_no_further_account_nor_row(accounts, engine, fake_am):
    """Account Management throttles (429, Retry-After) every call: each of the pass's AT_ONCE threads
    ends with the account it had under way, no other account is asked in that pass, and a throttled
    account's later rows wait too."""
    created = [accounts.create()[0] for _ in range(3 * AT_ONCE)]
    for account in created:
        write_events(engine, account, 1, [entitlements("read_only")])
        write_events(engine, account, 2, [DunningEntered(unpaid_since=None, failure_class="transient")])
        fake_am.answer_raw(account, 429, b"slow down", headers={"Retry-After": "120"})

    report = relay(engine, fake_am.url)

    asked = [r for r in created if outbox(engine, r)[0]["attempts"]]
    assert 1 <= len(asked) <= AT_ONCE and report.failed == len(asked) and report.delivered == 0
    assert set(asked) <= set(created[:AT_ONCE])  # the first in line, whichever thread took them
    for account in created:
        rows = outbox(engine, account)
        assert all(r["delivered_at"] is None for r in rows)  # the informational v2 waits behind v1


def test_a_pass_ended_by_the_soft_time_limit_leaves_its_accounts_locked_until_its_threads_are_done(
        accounts, engine, settings, fake_am):
    """Celery's soft time limit raises in the main thread only (a signal), here while it waits for the
    pass's threads: the task ends and the pass lock goes with it, while each thread still has its
    call under way. A pass started then (beat's next) relays the other accounts and skips those
    calls' accounts, whose locks their threads hold: no account is relayed by two passes at once, and
    no row is sent twice. The cut pass's threads end with their call: past their budget (the soft
    limit comes well after it), they take no other account."""
    created = [accounts.create()[0] for _ in range(2 * AT_ONCE)]
    # The passes get an engine of their own: the cut pass's threads hold two connections each until
    # the test lets their calls end, and the second pass needs as many again. The suite's engine is
    # shared with the in-process worker and earlier tests, so its pool of 10 may not have them all.
    passes = make_engine(settings.database_url, pool_size=4 * AT_ONCE + 2, max_overflow=0)
    try:
        _cut_pass_then_a_second(engine, passes, fake_am, created)
    finally:
        passes.dispose()


def _cut_pass_then_a_second(engine: Engine, passes: Engine, fake_am, created: list[str]) -> None:
    with freeze_time(datetime.now(UTC) + timedelta(minutes=1)) as clock:
        for account in created:
            write_events(engine, account, 1, [entitlements("read_only")])
        under_way: list[str] = []
        taking = threading.Lock()
        answer = threading.Event()
        main = threading.main_thread().ident
        assert main == threading.get_ident()

        def hold(request: Any) -> None:
            with taking:
                under_way.append(request.account_id)
                if len(under_way) == AT_ONCE:  # the pass's threads each wait on a call: time is up
                    signal.pthread_kill(main, signal.SIGUSR1)
            answer.wait(60)

        def soft_time_limit(_signum: int, _frame: Any) -> None:
            raise SoftTimeLimitExceeded()  # as billiard's handler in a prefork child

        fake_am.before_answer = hold
        previous = signal.signal(signal.SIGUSR1, soft_time_limit)
        try:
            with pytest.raises(SoftTimeLimitExceeded):
                relay(passes, fake_am.url)
        finally:
            signal.signal(signal.SIGUSR1, previous)
        cut = [t for t in threading.enumerate() if t.name.startswith("outbox-relay")]
        assert len(cut) == AT_ONCE and len(under_way) == AT_ONCE  # still in their calls

        fake_am.before_answer = None
        clock.tick(timedelta(seconds=60))  # the next pass comes after the cut one's budget
        second = relay(passes, fake_am.url)
        assert not second.busy  # the cut pass's lock went with its task
        assert second.skipped_locked == AT_ONCE and second.delivered == AT_ONCE
        assert sorted(r.account_id for r in fake_am.received) == sorted(set(created) - set(under_way))

        answer.set()
        for thread in cut:
            thread.join(60)
        assert not any(t.is_alive() for t in cut)
    assert sorted(r.account_id for r in fake_am.received) == sorted(created)  # each once
    for account in created:
        (row,) = outbox(engine, account)
        assert row["state"] == "delivered" and row["attempts"] == 1
