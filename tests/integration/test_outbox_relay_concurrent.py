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
from typing import Any, cast

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from freezegun import freeze_time
from sqlalchemy import Engine
from sqlalchemy.pool import QueuePool

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


def test_a_pass_cut_by_the_soft_time_limit_gives_back_what_it_holds_before_it_ends(
        accounts, engine, settings, fake_am):
    """Celery's soft time limit raises in the main thread only (a signal), here while it waits for the
    pass's threads, each with a call under way that Account Management holds. The threads went on
    with their calls, holding their account's lock (a connection each), then a second connection
    each to record the answer, into the worker process's next tasks (a next pass needs 9 of the
    pool's 10). Cut, the pass cuts its threads' calls and ends once they have recorded them: no
    connection of the pool is held and no thread is left. Each cut row says why, unblocked; its
    retry meets Account Management still processing the first request (409, the same key: not
    now), and once that is done the next pass delivers it."""
    created = [accounts.create()[0] for _ in range(2 * AT_ONCE)]
    passes = make_engine(settings.database_url)  # a worker process's pool of 10, the passes' own
    try:
        _cut_pass(engine, passes, fake_am, created)
    finally:
        passes.dispose()


def _cut_pass(engine: Engine, passes: Engine, fake_am, created: list[str]) -> None:
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
        try:
            assert len(under_way) == AT_ONCE
            assert cast(QueuePool, passes.pool).checkedout() == 0
            assert not [t for t in threading.enumerate() if t.name.startswith("outbox-relay") and t.is_alive()]
            for account in created:
                (row,) = outbox(engine, account)
                if account in under_way:
                    assert (row["state"], row["attempts"], row["last_status"], row["blocked_at"]) == (
                        "pending", 1, None, None)
                    assert row["last_error"].startswith("Cut: the relay pass ended during the call")
                else:
                    assert (row["state"], row["attempts"]) == ("pending", 0)  # never taken

            fake_am.before_answer = None
            clock.tick(timedelta(seconds=60))  # beat's next pass, past the cut rows' backoff
            second = relay(passes, fake_am.url)
            assert not second.busy and second.skipped_locked == 0
            assert (second.delivered, second.failed) == (AT_ONCE, AT_ONCE)
            for account in under_way:
                (row,) = outbox(engine, account)
                assert (row["attempts"], row["last_status"], row["blocked_at"]) == (2, 409, None)
        finally:
            answer.set()
        assert fake_am.settled()

        clock.tick(timedelta(hours=1))
        assert relay(passes, fake_am.url).delivered == AT_ONCE
    for account in created:
        (row,) = outbox(engine, account)
        assert row["state"] == "delivered" and row["attempts"] == (3 if account in under_way else 1)
        # One request per row, whichever times Account Management received it.
        assert {r.idempotency_key for r in fake_am.entitlements(account)} == {f"outbox-{row['id']}"}
