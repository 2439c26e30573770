# ruff: noqa: F811
"""A remediation whose recompute failed on the infrastructure is on its way, not reverted, for a while.

A remediation's recompute that meets a failure that passes (the database down, a lock contended
longer than the task's own retries) is left 'retrying' in subs_stuck_events, with its request live,
and beat re-drives it every 5 minutes until it runs. Since 12732b5 a 'retrying' recompute is drift,
not pending (one that keeps failing would otherwise hide its drift from every sweep for ever), and
the next sweep's finding the account drifted the same way is what the rollout gate counts as
reverted: so an outage of a quarter of an hour around a sweep stepped the rollout back, as if
remediating were wrong. An infrastructure failure (database, broker, lock contention) is re-driven
for gather_batch.REDRIVE_GRACE from its first failure before it counts: until then the account is
pending, as one whose recompute waits on the queue. Failing longer, of another class, or dead, it
counts as before.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine

from app.recompute.service import run_recompute
from app.rollout.gate import check_gate
from app.sweep.sweep import Sweeper, remediation_cause
from tasks.failures import FailureKind, record_stuck, resolve_stuck
from tests.conftest import Accounts
from tests.integration.test_sweep import Recorder, rollout_off, set_stage, settle, sql  # noqa: F401

RECOMPUTE = "tasks.recompute_account"


def _corrupted(accounts: Accounts, runtime, engine: Engine, at: datetime) -> str:
    """A settled current account whose stored status says bad_debt."""
    account, _ = accounts.create()
    settle(engine, runtime.policy, account, at)
    sql(engine, "UPDATE subs_dunning SET status = 'bad_debt' WHERE account_id = %(a)s", a=account)
    return account


def _remediated(accounts: Accounts, runtime, engine: Engine, t0: datetime) -> tuple[str, int]:
    """An account in the named stage, remediated by a sweep 40 minutes before ``t0`` (the recompute
    not run yet) -> (account, that sweep's run id)."""
    account = _corrupted(accounts, runtime, engine, t0 - timedelta(hours=2))
    set_stage(engine, "named", [account], entered=t0 - timedelta(hours=3))
    first = Sweeper(engine, runtime.policy, Recorder(), clock=lambda: t0 - timedelta(minutes=40)).start()
    assert first.enqueued == 1
    return account, int(first.run_id or 0)


def _recompute_failed(engine: Engine, account: str, run_id: int, kind: FailureKind) -> None:
    """The remediation's recompute gave up its own retries on ``kind``, as tasks.recompute writes it."""
    args = {"account_id": account, "trigger": "DRIFT_DETECTED", "cause": remediation_cause(run_id)}
    assert record_stuck(engine, RECOMPUTE, args, account, kind, f"{kind.value}: the infrastructure", 11,
                        "retrying")


@pytest.mark.parametrize("kind", [FailureKind.DATABASE_UNAVAILABLE, FailureKind.LOCK_CONTENTION,
                                  FailureKind.BROKER_UNAVAILABLE])
def test_a_remediation_retrying_on_an_infrastructure_failure_is_pending_not_reverted(
        accounts: Accounts, runtime, engine: Engine, rollout_off: None, kind: FailureKind):
    t0 = datetime.now(UTC)
    account, run_id = _remediated(accounts, runtime, engine, t0)
    _recompute_failed(engine, account, run_id, kind)

    recorder = Recorder()
    second = Sweeper(engine, runtime.policy, recorder, clock=lambda: t0 - timedelta(minutes=20)).start()
    assert (second.drifted, second.pending, second.enqueued) == (0, 1, 0), second.to_json()
    assert recorder.sent == []  # the re-drive sends it
    _decision, health, _state = check_gate(engine, runtime.policy, t0)
    assert (health.remediations, health.reverted) == (1, 0), health

    # The outage passes: the re-drive's run remediates, and the row is resolved.
    run_recompute(engine, runtime.policy, account, "DRIFT_DETECTED", datetime.now(UTC), coalesced=True)
    resolve_stuck(engine, RECOMPUTE, account)
    third = Sweeper(engine, runtime.policy, Recorder(), clock=lambda: t0 - timedelta(minutes=5)).start()
    assert (third.drifted, third.pending) == (0, 0), third.to_json()
    _decision, health, _state = check_gate(engine, runtime.policy, t0)
    assert (health.remediations, health.reverted) == (1, 0), health


def test_a_remediation_failing_on_the_infrastructure_past_the_grace_is_drift_again_and_reverted(
        accounts: Accounts, runtime, engine: Engine, rollout_off: None):
    """Still failing after REDRIVE_GRACE of re-drives: a recompute that keeps failing (12732b5)."""
    t0 = datetime.now(UTC)
    account, run_id = _remediated(accounts, runtime, engine, t0)
    _recompute_failed(engine, account, run_id, FailureKind.LOCK_CONTENTION)
    # failing for two hours: twice gather_batch.REDRIVE_GRACE
    sql(engine, "UPDATE subs_stuck_events SET first_failed_at = now() - interval '2 hours'")

    recorder = Recorder()
    second = Sweeper(engine, runtime.policy, recorder, clock=lambda: t0 - timedelta(minutes=20)).start()
    assert (second.drifted, second.pending, second.enqueued) == (1, 0, 1), second.to_json()
    assert [a for a, _ in recorder.sent] == [account]
    _decision, health, _state = check_gate(engine, runtime.policy, t0)
    assert (health.remediations, health.reverted) == (2, 1), health


@pytest.mark.parametrize("state", ["retrying", "dead"])
def test_a_remediation_failing_for_a_reason_not_the_infrastructures_counts_at_once(
        accounts: Accounts, runtime, engine: Engine, rollout_off: None, state: str):
    """A failure of another class (a remote side refusing, invalid data, a bug): no grace."""
    t0 = datetime.now(UTC)
    account, run_id = _remediated(accounts, runtime, engine, t0)
    kind = FailureKind.REMOTE_UNAVAILABLE if state == "retrying" else FailureKind.INVALID_DATA
    args = {"account_id": account, "trigger": "DRIFT_DETECTED", "cause": remediation_cause(run_id)}
    assert record_stuck(engine, RECOMPUTE, args, account, kind, "not the infrastructure", 1, state)

    second = Sweeper(engine, runtime.policy, Recorder(), clock=lambda: t0 - timedelta(minutes=20)).start()
    if state == "retrying":
        assert (second.drifted, second.pending, second.enqueued) == (1, 0, 1), second.to_json()
    _decision, health, _state = check_gate(engine, runtime.policy, t0)
    assert health.reverted == 1, health
