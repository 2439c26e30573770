# ruff: noqa: F811
"""How the sweep remediates.

Rule: a remediation is requested as every producer requests a recompute: a recompute_request row
(trigger DRIFT_DETECTED, cause drift_sweep:<run>) committed, then the task sent coalesced. So while
it waits on the queue the account is pending for the next sweep (not the same drift found again,
which the rollout gate would count as a reverted remediation), the run that takes the request
records DRIFT_DETECTED as its trigger, and a lost message is sent again by beat's re-drive. A
request that appeared since the page was read belongs to its producer: the account is pending.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from app.domain.snapshot import Snapshot
from app.recompute.gather_batch import Pending
from app.recompute.service import run_recompute
from app.rollout.gate import check_gate
from app.sweep.sweep import Found, Sweeper, SweepReport
from tests.conftest import Accounts
from tests.integration.test_sweep import (  # noqa: F401
    Recorder,
    dunning,
    parked_request,
    refuse,
    rollout_off,
    set_stage,
    settle,
    sql,
)


def _corrupted(accounts: Accounts, runtime, engine: Engine, at: datetime) -> str:
    """A settled current account whose stored status says bad_debt."""
    account, _ = accounts.create()
    settle(engine, runtime.policy, account, at)
    sql(engine, "UPDATE subs_dunning SET status = 'bad_debt' WHERE account_id = %(a)s", a=account)
    return account


def test_a_remediation_is_a_request_then_a_coalesced_recompute_triggered_by_the_drift(
        accounts: Accounts, runtime, engine: Engine, rollout_off: None):
    account = _corrupted(accounts, runtime, engine, datetime.now(UTC))
    set_stage(engine, "100")
    recorder = Recorder()
    report = Sweeper(engine, runtime.policy, recorder).start()
    assert recorder.sent == [(account, report.run_id)] and report.enqueued == 1
    assert [tuple(r) for r in sql(engine, "SELECT account_id, trigger, cause FROM recompute_request")] == \
        [(account, "DRIFT_DETECTED", f"drift_sweep:{report.run_id}")]
    assert sql(engine, "SELECT remediated FROM drift_record")[0][0] is True

    # The task the enqueuer sent (coalesced) takes that request.
    result = run_recompute(engine, runtime.policy, account, "DRIFT_DETECTED", datetime.now(UTC), coalesced=True)
    assert result.outcome == "changed"
    assert tuple(sql(engine, "SELECT status, last_trigger FROM subs_dunning WHERE account_id = %(a)s",
                     a=account)[0]) == ("current", "DRIFT_DETECTED")
    assert sql(engine, "SELECT count(*) FROM recompute_request")[0][0] == 0


def test_a_remediation_still_queued_at_the_next_sweep_is_not_counted_as_reverted(
        accounts: Accounts, runtime, engine: Engine, rollout_off: None):
    """The sweep's DRIFT_DETECTED recompute is still on the queue when the next sweep comes (a
    15-minute recompute backlog, a renewal-day webhook burst). Before, the next sweep found the same
    drift, remediated it again, and the gate counted the first remediation as reverted (a rollback)."""
    t0 = datetime.now(UTC)
    account = _corrupted(accounts, runtime, engine, t0 - timedelta(hours=2))
    set_stage(engine, "named", [account], entered=t0 - timedelta(hours=3))
    first = Sweeper(engine, runtime.policy, Recorder(), clock=lambda: t0 - timedelta(minutes=30)).start()
    recorder = Recorder()
    second = Sweeper(engine, runtime.policy, recorder, clock=lambda: t0 - timedelta(minutes=15)).start()
    assert (first.enqueued, second.drifted, second.pending, second.enqueued) == (1, 0, 1, 0)
    assert recorder.sent == []
    _decision, health, _state = check_gate(engine, runtime.policy, t0)
    assert (health.remediations, health.reverted) == (1, 0), health


class _WebhookFirst(Sweeper):
    """A webhook stores its request between the sweep's read and its remediation."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.webhook_account = ""

    def _request(self, report: SweepReport, account_ids: list[str], *args: Any
                 ) -> tuple[set[str], set[str], set[str]] | None:
        sql(self.engine, "INSERT INTO recompute_request (account_id, trigger, cause) "
                         "VALUES (%(a)s, 'PAYMENT_FAILED', 'evt_1')", a=self.webhook_account)
        return super()._request(report, account_ids, *args)


def test_a_request_made_since_the_read_is_left_to_its_producer(accounts: Accounts, runtime, engine: Engine,
                                                               rollout_off: None):
    account = _corrupted(accounts, runtime, engine, datetime.now(UTC))
    set_stage(engine, "100")
    recorder = Recorder()
    sweeper = _WebhookFirst(engine, runtime.policy, recorder)
    sweeper.webhook_account = account
    report = sweeper.start()
    assert (report.drifted, report.pending, report.enqueued) == (0, 1, 0)
    assert recorder.sent == []
    assert sql(engine, "SELECT count(*) FROM drift_record")[0][0] == 0
    assert tuple(sql(engine, "SELECT trigger, cause FROM recompute_request")[0]) == ("PAYMENT_FAILED", "evt_1")


def test_a_request_parked_by_a_dead_recompute_is_touched_and_sent(accounts: Accounts, runtime, engine: Engine,
                                                                  rollout_off: None):
    """Nothing re-sends a parked request; the sweep asking for the account again does (and touching
    it un-parks it, so the re-drive sends it too should this message be lost)."""
    account = _corrupted(accounts, runtime, engine, datetime.now(UTC))
    parked_request(engine, account)
    set_stage(engine, "100")
    recorder = Recorder()
    report = Sweeper(engine, runtime.policy, recorder).start()
    assert [a for a, _ in recorder.sent] == [account] and report.enqueued == 1
    assert sql(engine, "SELECT parked_touch IS DISTINCT FROM touched_at FROM recompute_request")[0][0] is True


def test_a_remediation_the_broker_refused_stays_requested_for_the_redrive(accounts: Accounts, runtime,
                                                                          engine: Engine, rollout_off: None):
    account = _corrupted(accounts, runtime, engine, datetime.now(UTC))
    set_stage(engine, "100")

    def broker_down(account_id: str, run_id: int | None) -> str:
        raise ConnectionError("broker down")

    report = Sweeper(engine, runtime.policy, broker_down).start()
    # deferred, not an error (test_rollout_broker_refused_remediation.py): a remediation all the same
    assert (report.errors, report.enqueued, report.deferred) == (0, 0, 1)
    assert tuple(sql(engine, "SELECT remediated, skipped FROM drift_record")[0]) == (True, None)
    assert [tuple(r) for r in sql(engine, "SELECT account_id, trigger FROM recompute_request")] == \
        [(account, "DRIFT_DETECTED")]


def test_a_remediation_whose_recompute_keeps_failing_is_found_drifted_again_and_counted_reverted(
        accounts: Accounts, runtime, engine: Engine, rollout_off: None):
    """A remediation's recompute failing with a passing failure (lock contention, a statement
    timeout) past its own retries stays 'retrying' with its request live, re-driven maybe for ever.
    The gate does not count 'retrying' rows as reverted because the next sweep finds such an account
    drifted the same way: so that sweep must not take its live request for a recompute on its way.
    (Failing for two hours: within gather_batch.REDRIVE_GRACE of its first failure, an infrastructure
    failure's recompute is on its way, test_rollout_remediation_redriven.py.)"""
    from app.rollout.gate import check_gate

    t0 = datetime.now(UTC)
    account = _corrupted(accounts, runtime, engine, t0 - timedelta(hours=2))
    set_stage(engine, "named", [account], entered=t0 - timedelta(hours=3))
    first = Sweeper(engine, runtime.policy, Recorder(), clock=lambda: t0 - timedelta(minutes=40)).start()
    assert first.enqueued == 1
    sql(engine, "INSERT INTO subs_stuck_events (task_name, account_id, task_args, error_class, error, attempts, "
                "state, first_failed_at, last_failed_at, next_redrive_at) VALUES ('tasks.recompute_account', %(a)s, "
                "jsonb_build_object('account_id', %(a)s, 'trigger', 'DRIFT_DETECTED'), 'lock_contention', "
                "'TimedOut: canceling statement due to statement timeout', 9, 'retrying', now() - interval '2 hours', "
                "now(), now())", a=account)
    assert sql(engine, "SELECT count(*) FROM recompute_request WHERE account_id = %(a)s", a=account)[0][0] == 1

    second = Sweeper(engine, runtime.policy, Recorder(), clock=lambda: t0 - timedelta(minutes=20)).start()
    _decision, health, _state = check_gate(engine, runtime.policy, t0)
    assert (second.drifted, second.pending, second.enqueued) == (1, 0, 1)
    assert (health.remediations, health.reverted) == (2, 1)


class _RecomputedSinceTheRead(Sweeper):
    """A webhook's recompute runs, and commits, between the sweep's read of a page and its decision:
    the request it took is gone by the time the sweep asks for the account, and its stored state is
    no longer the one the sweep compared."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.racing_account = ""

    def _batch(self, report: SweepReport, ids: list[str], gathered: dict[str, tuple[Snapshot, int]],
               pending: Pending, named: tuple[str, ...]) -> list[Found]:
        if self.racing_account in gathered:
            result = run_recompute(self.engine, self.policy, self.racing_account, "PAYMENT_FAILED",
                                   datetime.now(UTC))
            assert result.outcome == "changed"
        return super()._batch(report, ids, gathered, pending, named)


def test_an_out_of_stage_account_recomputed_since_the_read_is_not_recorded_as_drift(
        accounts: Accounts, runtime, engine: Engine, rollout_off: None):
    account = _corrupted(accounts, runtime, engine, datetime.now(UTC))
    sweeper = _RecomputedSinceTheRead(engine, runtime.policy, refuse)
    sweeper.racing_account = account
    report = sweeper.start()
    assert (report.drifted, report.pending) == (0, 1), report.drifted_accounts
    assert sql(engine, "SELECT count(*) FROM drift_record")[0][0] == 0
    assert sql(engine, "SELECT drifted FROM sweep_run")[0][0] == 0


class _RecomputedWhileRequesting(Sweeper):
    """A webhook's request is taken by its recompute, which commits after the sweep checked the page's
    accounts as read and before the sweep's own request is stored (or while that request waits for the
    row the recompute is deleting): the sweep's request is then a new one, not the webhook's."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.racing_account = ""

    def _request(self, report: SweepReport, account_ids: list[str], *args: Any) -> Any:
        if self.racing_account in account_ids:
            sql(self.engine, "INSERT INTO recompute_request (account_id, trigger, cause) "
                             "VALUES (%(a)s, 'PAYMENT_FAILED', 'evt_1')", a=self.racing_account)
            result = run_recompute(self.engine, self.policy, self.racing_account, "PAYMENT_FAILED",
                                   datetime.now(UTC), coalesced=True)
            assert result.outcome == "changed"
        return super()._request(report, account_ids, *args)


@pytest.mark.parametrize("sweeper_class", [_RecomputedSinceTheRead, _RecomputedWhileRequesting],
                         ids=["before_the_as_read_check", "after_the_as_read_check"])
def test_an_account_recomputed_since_the_read_is_neither_drift_nor_remediated(
        accounts: Accounts, runtime, engine: Engine, rollout_off: None,
        sweeper_class: type[_RecomputedSinceTheRead] | type[_RecomputedWhileRequesting]):
    """Before, the sweep recorded the drift it read (the stored values a webhook's recompute had just
    replaced), created a new request and sent a DRIFT_DETECTED recompute, counted by the gate as a
    remediation: when the recompute committed before the sweep's check of the page as read, and
    (until the check was made again once the requests are stored) when it committed between that
    check and the sweep's own request, which then was a new one."""
    account = _corrupted(accounts, runtime, engine, datetime.now(UTC))
    set_stage(engine, "100")
    recorder = Recorder()
    sweeper = sweeper_class(engine, runtime.policy, recorder)
    sweeper.racing_account = account
    report = sweeper.start()
    assert (report.drifted, report.pending, report.enqueued) == (0, 1, 0), report.drifted_accounts
    assert recorder.sent == []
    assert sql(engine, "SELECT count(*) FROM drift_record")[0][0] == 0
    assert sql(engine, "SELECT count(*) FROM recompute_request")[0][0] == 0
    assert dunning(engine, account)[0] == "current"


class _DeletedWhileRequesting(Sweeper):
    """The owner (another team) deletes the account after the sweep checked its page as read and
    before the sweep's own request is stored: subs_account has no row for it any more."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.racing_account = ""

    def _request(self, report: SweepReport, account_ids: list[str], *args: Any) -> Any:
        if self.racing_account in account_ids:
            with self.engine.begin() as conn:  # as Account Management deletes an account (test_shared_tables.py)
                conn.exec_driver_sql("DELETE FROM subs_customer WHERE account_id = %(a)s", {"a": self.racing_account})
                conn.exec_driver_sql("DELETE FROM subs_account WHERE account_id = %(a)s", {"a": self.racing_account})
        return super()._request(report, account_ids, *args)


def test_an_account_deleted_since_the_read_is_not_remediated(accounts: Accounts, runtime, engine: Engine,
                                                             rollout_off: None):
    """Before, the check made again once the requests are stored took an account it no longer found
    for one whose stored state had not changed: its DRIFT_DETECTED recompute was requested and sent,
    ended as a dead stuck row (AccountNotFound), and the rollout gate counted that as a reverted
    remediation. An account gone is left out, as the check as read leaves it out."""
    account = _corrupted(accounts, runtime, engine, datetime.now(UTC))
    set_stage(engine, "100")
    recorder = Recorder()
    sweeper = _DeletedWhileRequesting(engine, runtime.policy, recorder)
    sweeper.racing_account = account
    report = sweeper.start()
    assert recorder.sent == []
    assert (report.drifted, report.enqueued) == (0, 0), report.drifted_accounts
    assert sql(engine, "SELECT count(*) FROM recompute_request")[0][0] == 0
    assert sql(engine, "SELECT count(*) FROM drift_record")[0][0] == 0
    assert tuple(sql(engine, "SELECT drifted, in_stage, enqueued FROM sweep_run")[0]) == (0, 0, 0)
