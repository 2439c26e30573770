"""A recompute's clock is read once it holds the account's lock, never before.

A run that waits for the lock (another recompute of the account holds it, up to lock_timeout) and
then computes at the moment it started would apply an older moment over the newer run's decision:
a level just escalated at a day boundary eased again, or bad debt entered, left and entered again
(two episodes, two cancellations under two keys)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery
from freezegun import freeze_time
from sqlalchemy import Connection, Engine

from app.cli import main
from app.domain.compute import Decision, compute
from app.recompute.apply import apply
from app.recompute.gather import gather
from app.recompute.service import run_recompute
from app.runtime import Runtime
from tests.conftest import post_event, wait_for
from tests.integration.test_outbox_cancellation_body import declined_charge, failed_invoice
from tests.stripe_events import unique

DAY = 86400
# The recompute's advisory lock (app/recompute/service.py LOCK_AND_TAKE_SQL), as pg_locks shows a
# wait for it in this database: the key's high and low 32 bits.
LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtextextended(%(a)s, 7281))"
WAITING_SQL = """
SELECT count(*) FROM pg_locks l, (SELECT hashtextextended(%(a)s, 7281) AS k) key
 WHERE l.locktype = 'advisory' AND NOT l.granted
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.classid::bigint = ((key.k >> 32) & 4294967295) AND l.objid::bigint = (key.k & 4294967295)
"""


def outbox_events(engine: Engine, account: str) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.exec_driver_sql(
            "SELECT event_type FROM outbox WHERE account_id = %(a)s ORDER BY id", {"a": account})]


def stored_state(engine: Engine, account: str) -> tuple[str, str]:
    with engine.connect() as conn:
        status, level = conn.exec_driver_sql("SELECT status, level FROM subs_dunning WHERE account_id = %(a)s",
                                             {"a": account}).one()
    return status, level


def waiting_for_lock(engine: Engine, account: str) -> bool:
    with engine.connect() as conn:
        return bool(conn.exec_driver_sql(WAITING_SQL, {"a": account}).scalar())


def unpaid_since_days_ago(client, engine: Engine, runtime: Runtime, accounts, days: int, decline: str
                          ) -> tuple[str, datetime]:
    """An account whose invoice failed ``days`` ago with ``decline``, recomputed now: it and its
    unpaid_since."""
    account, customer = accounts.create()
    invoice, t0 = unique("in"), int(time.time()) - days * DAY
    assert post_event(client, failed_invoice(customer, invoice, t0)).status_code == 200
    assert post_event(client, declined_charge(customer, t0 + 1, decline)).status_code == 200
    first = run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED", datetime.now(UTC))
    assert first.decision is not None and first.decision.state.unpaid_since is not None
    return account, first.decision.state.unpaid_since


@contextmanager
def waiting_for_the_lock(engine: Engine, account: str, start: Callable[[], object], starts_at: datetime,
                         then: datetime) -> Iterator[Connection]:
    """A recompute (``start``, on a thread of its own) started at ``starts_at`` while the yielded
    connection (another recompute) holds the account's lock; the wall clock reaches ``then`` while
    it waits. Whatever the block applies on the connection commits when it ends, which lets the
    recompute go on."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            start()
        except BaseException as exc:  # reported on the test's thread, after join
            errors.append(exc)

    with engine.connect() as holder, freeze_time(starts_at) as clock:
        holder.begin()
        holder.exec_driver_sql(LOCK_SQL, {"a": account})
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        wait_for(lambda: waiting_for_lock(engine, account), message="the recompute waiting for the account lock")
        clock.move_to(then)
        yield holder
        holder.commit()  # releases the lock
        worker.join(30)
    assert not worker.is_alive(), "the recompute never finished"
    assert not errors, errors


def task_waiting_for_the_lock(engine: Engine, celery_app: Celery, account: str, starts_at: datetime,
                              then: datetime) -> AbstractContextManager[Connection]:
    """tasks.recompute_account, as waiting_for_the_lock runs it."""
    import tasks.recompute  # noqa: F401  registers the task

    task = celery_app.tasks["tasks.recompute_account"]
    return waiting_for_the_lock(engine, account, lambda: task.apply(args=[account, "STATE_REFRESH", "webhook"],
                                                                    throw=True), starts_at, then)


def newer_run(holder: Connection, runtime: Runtime, account: str, at: datetime) -> Decision:
    """The recompute holding the lock: it computes at ``at`` and applies its decision."""
    gathered = gather(holder, account)
    assert gathered is not None
    snapshot, version = gathered
    decision = compute(snapshot, runtime.policy, at)
    apply(holder, snapshot, version, decision, "STATE_REFRESH", at)
    return decision


def test_a_run_that_waited_for_the_lock_does_not_ease_a_level_escalated_meanwhile(
        client, accounts, engine, runtime, celery_app):
    """Rule: the clock is read after the lock is taken. Started a second before the 7-day boundary,
    the task waits while another run escalates the account at the boundary; when its turn comes it
    is past the boundary too, and keeps the escalation (no ConsequenceEased)."""
    account, unpaid_since = unpaid_since_days_ago(client, engine, runtime, accounts, 6, "insufficient_funds")
    assert stored_state(engine, account) == ("past_due", "notice")
    boundary = unpaid_since + timedelta(days=7)  # restrict_premium from here

    with task_waiting_for_the_lock(engine, celery_app, account, starts_at=boundary - timedelta(seconds=1),
                                   then=boundary + timedelta(seconds=2)) as holder:
        assert newer_run(holder, runtime, account, boundary + timedelta(seconds=1)).state.level == "restrict_premium"

    assert stored_state(engine, account) == ("past_due", "restrict_premium")
    assert "ConsequenceEased" not in outbox_events(engine, account), outbox_events(engine, account)


def test_a_run_that_waited_for_the_lock_does_not_leave_bad_debt_entered_meanwhile(
        client, accounts, engine, runtime, celery_app):
    """Rule: the clock is read after the lock is taken. At the 21-day boundary a run that waited
    while another one entered bad debt must not take the account out again: the next review would
    enter it once more, with a second episode and a second cancellation under another key."""
    account, unpaid_since = unpaid_since_days_ago(client, engine, runtime, accounts, 20, "expired_card")
    assert stored_state(engine, account)[0] == "past_due"
    boundary = unpaid_since + timedelta(days=21)  # bad debt from here

    with task_waiting_for_the_lock(engine, celery_app, account, starts_at=boundary - timedelta(seconds=1),
                                   then=boundary + timedelta(seconds=2)) as holder:
        assert newer_run(holder, runtime, account, boundary + timedelta(seconds=1)).state.status == "bad_debt"
    # The review due at the boundary comes too.
    run_recompute(engine, runtime.policy, account, "STATE_REFRESH", boundary + timedelta(seconds=30))

    events: list[Any] = outbox_events(engine, account)
    assert [e for e in events if e.startswith("BadDebt")] == ["BadDebtEntered"], events
    assert events.count("CancellationRequested") == 1, events
    with engine.connect() as conn:
        episodes = conn.exec_driver_sql("SELECT count(*) FROM bad_debt_episode WHERE account_id = %(a)s",
                                        {"a": account}).scalar_one()
    assert episodes == 1


def test_dunning_recompute_that_waited_for_the_lock_does_not_ease_a_level_escalated_meanwhile(
        client, accounts, engine, runtime, cli_env):
    """The same rule for `dunning recompute`: an operator's run that waited behind the escalation
    at the 7-day boundary computes at the moment it got the lock."""
    account, unpaid_since = unpaid_since_days_ago(client, engine, runtime, accounts, 6, "insufficient_funds")
    boundary = unpaid_since + timedelta(days=7)

    def cli() -> None:
        assert main(["recompute", account]) == 0

    with waiting_for_the_lock(engine, account, cli, starts_at=boundary - timedelta(seconds=1),
                              then=boundary + timedelta(seconds=2)) as holder:
        assert newer_run(holder, runtime, account, boundary + timedelta(seconds=1)).state.level == "restrict_premium"

    assert stored_state(engine, account) == ("past_due", "restrict_premium")
    assert "ConsequenceEased" not in outbox_events(engine, account), outbox_events(engine, account)
