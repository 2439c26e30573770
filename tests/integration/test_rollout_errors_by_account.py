# ruff: noqa: F811
"""The rollout gate counts the accounts the sweeps failed on, not one error per sweep per account.

One account whose stored row cannot be read fails every sweep (every 15 minutes). Summed per sweep,
that one account passed max_errors (5) within two hours and stepped the rollout back at every gate
check, down to off, although the remediation was sound for every other account. It is one error now:
seen in the health, the metrics and the sweep's records, never a step back on its own. Distinct
failing accounts past the limit still step back, and errors not about one account (a page whose
requests could not be stored, a sweep that failed) count each once.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from freezegun import freeze_time
from psycopg2.extras import Json
from sqlalchemy import Engine

from app import metrics
from app.rollout.gate import check_gate
from app.sweep import sweep as sweep_module
from app.sweep.sweep import Sweeper
from tests.conftest import service_headers
from tests.integration.test_sweep import Recorder, corrupted, rollout_off, set_stage, sql  # noqa: F401

SWEEP_EVERY = timedelta(minutes=15)  # beat's drift_sweep


def unreadable(engine: Engine, account: str) -> Any:
    """Edit the account's stored reasons into a shape no recompute writes (by hand): its rows cannot be
    built into a snapshot, every sweep. -> the reasons it had, to put back."""
    before = sql(engine, "SELECT reasons FROM subs_dunning WHERE account_id = %(a)s", a=account)[0][0]
    sql(engine, "UPDATE subs_dunning SET reasons = '[{\"detail\": \"edited by hand\"}]' WHERE account_id = %(a)s",
        a=account)
    return before


def repaired(engine: Engine, account: str, reasons: Any) -> None:
    sql(engine, "UPDATE subs_dunning SET reasons = %(r)s WHERE account_id = %(a)s", r=Json(reasons), a=account)


def sweep_at(engine: Engine, policy: Any, at: datetime, enqueue: Any = None) -> Any:
    with freeze_time(at, tick=True):
        return Sweeper(engine, policy, enqueue or Recorder()).start()


def gate_at(engine: Engine, policy: Any, at: datetime) -> Any:
    with freeze_time(at, tick=True):
        return check_gate(engine, policy, datetime.now(UTC))


def unreadable_errors_counted() -> float:
    return float(metrics.SWEEP_ERRORS.labels("unreadable")._value.get())


def test_one_account_failing_every_sweep_is_one_error_not_a_step_back_each_check(
        runtime, engine: Engine, client, corrupted: dict[str, str]):
    t0 = datetime.now(UTC).replace(microsecond=0)
    drifted = [corrupted[n] for n in ("paid", "unpaid", "flagged")]
    set_stage(engine, "5", named=drifted, entered=t0 - timedelta(hours=30))
    poison = corrupted["ok_other"]
    unreadable(engine, poison)
    counted = unreadable_errors_counted()

    sweeps = [sweep_at(engine, runtime.policy, t0 + n * SWEEP_EVERY) for n in range(8)]  # two hours of sweeps
    assert [s.errors for s in sweeps] == [1] * 8 and all(s.finished for s in sweeps)
    assert sweeps[0].enqueued == 3  # the other accounts were remediated

    # Still seen: every sweep records it, the metric counts it, the rollout's status shows it.
    records = sql(engine, "SELECT sweep_id, account_id, kind FROM sweep_error ORDER BY sweep_id")
    assert [(r.sweep_id, r.account_id, r.kind) for r in records] == [(s.run_id, poison, "unreadable") for s in sweeps]
    assert [r.errors for r in sql(engine, "SELECT errors FROM sweep_run ORDER BY id")] == [1] * 8
    assert unreadable_errors_counted() == counted + 8
    with freeze_time(t0 + 2 * timedelta(hours=1), tick=True):
        view = client.get("/ops/rollout", headers=service_headers()).json
    assert view["health"]["errors"] == 1, view["health"]

    # One error, within max_errors (5): the gate goes on as it would without it (healthy past the soak).
    decision, health, state = gate_at(engine, runtime.policy, t0 + 2 * timedelta(hours=1))
    assert health.errors == 1, health
    assert decision.action == "advance" and "1 errors" in decision.reason, decision
    assert (state.stage, state.held) == ("10", False)


def test_with_max_errors_0_one_account_failing_every_sweep_steps_back_at_every_stage_down_to_off(
        runtime, engine: Engine, corrupted: dict[str, str]):
    """The exception to "never a step back on its own": [rollout] max_errors = 0 (the policy allows
    it) tolerates no error at all, and the account failing every sweep is one error at each stage,
    since every stage change starts the health afresh and the next sweep fails on it again. So the
    rollout steps back one stage per sweep until off, held, as the limit says (DESIGN 6: the gate
    steps back by itself when health is breached)."""
    t0 = datetime.now(UTC).replace(microsecond=0)
    strict = replace(runtime.policy, extra={**runtime.policy.extra, "rollout": {"max_errors": 0}})
    set_stage(engine, "10", entered=t0 - timedelta(hours=30))
    unreadable(engine, corrupted["ok_other"])

    stages = []
    for n in range(5):
        assert sweep_at(engine, strict, t0 + n * SWEEP_EVERY).errors == 1
        decision, health, state = gate_at(engine, strict, t0 + n * SWEEP_EVERY + timedelta(minutes=5))
        assert health.errors == 1, health
        stages.append((decision.action, state.stage, state.held))
        if decision.action == "rollback":
            assert "1 errors > limit 0" in decision.reason, decision
    assert stages == [("rollback", "5", True), ("rollback", "named", True), ("rollback", "off", True),
                      ("none", "off", True), ("none", "off", True)]


def test_more_distinct_failing_accounts_than_the_limit_still_step_back(runtime, engine: Engine,
                                                                        corrupted: dict[str, str]):
    """Six accounts (max_errors 5 + 1), three failing in one sweep and the other three in the next:
    no sweep alone had more than 3 errors, the window has 6 accounts."""
    t0 = datetime.now(UTC).replace(microsecond=0)
    set_stage(engine, "25", entered=t0 - timedelta(hours=30))
    accounts = sorted(corrupted.values())
    first, second = accounts[:3], accounts[3:]
    kept = {a: unreadable(engine, a) for a in first}
    assert sweep_at(engine, runtime.policy, t0).errors == 3
    for account, reasons in kept.items():
        repaired(engine, account, reasons)
    for account in second:
        unreadable(engine, account)
    assert sweep_at(engine, runtime.policy, t0 + SWEEP_EVERY).errors == 3

    decision, health, state = gate_at(engine, runtime.policy, t0 + 2 * SWEEP_EVERY)
    assert health.errors == 6, health
    assert decision.action == "rollback" and "6 errors > limit 5" in decision.reason, decision
    assert (state.stage, state.held) == ("10", True)


def test_a_page_whose_requests_could_not_be_stored_is_one_error_each_time(
        runtime, engine: Engine, corrupted: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """Not about one account: each such page counts once, in every sweep it happens (not folded into
    one as an account's errors are), and not once per account of the page."""
    t0 = datetime.now(UTC).replace(microsecond=0)
    set_stage(engine, "100", entered=t0 - timedelta(hours=30))

    def database_refused(*args: Any, **kwargs: Any) -> bool:
        raise ConnectionError("the database went away")

    monkeypatch.setattr(sweep_module, "request_recompute", database_refused)
    reports = [sweep_at(engine, runtime.policy, t0 + n * SWEEP_EVERY) for n in range(2)]
    assert [(r.errors, r.in_stage, r.enqueued) for r in reports] == [(1, 3, 0)] * 2
    assert {r.skipped for r in sql(engine, "SELECT skipped FROM drift_record")} == {"error"}
    assert [(r.account_id, r.kind) for r in sql(engine, "SELECT account_id, kind FROM sweep_error")] == \
        [(None, "request")] * 2

    _decision, health, _state = gate_at(engine, runtime.policy, t0 + 2 * SWEEP_EVERY)
    assert health.errors == 2, health


def test_a_sweep_that_fails_is_one_error(runtime, engine: Engine, corrupted: dict[str, str],
                                         monkeypatch: pytest.MonkeyPatch):
    t0 = datetime.now(UTC).replace(microsecond=0)
    set_stage(engine, "100", entered=t0 - timedelta(hours=30))

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in drift")

    monkeypatch.setattr(sweep_module._PageDrifts, "of", broken)
    with pytest.raises(RuntimeError, match="a bug in drift"):
        sweep_at(engine, runtime.policy, t0)
    assert tuple(sql(engine, "SELECT state, errors FROM sweep_run")[0]) == ("failed", 1)
    assert [(r.account_id, r.kind) for r in sql(engine, "SELECT account_id, kind FROM sweep_error")] == \
        [(None, "failed")]
    _decision, health, _state = gate_at(engine, runtime.policy, t0 + SWEEP_EVERY)
    assert health.errors == 1, health
