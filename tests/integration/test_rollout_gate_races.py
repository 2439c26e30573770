# ruff: noqa: F811
"""The rollout gate at its edges (DESIGN section 6): stage membership, a breach exactly at the
limit, two gate checks at once, an operator's change racing the gate, and a stage change landing
between a sweep page's remediation requests and its drift records."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Flask
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine

from app.domain.rollout import STAGES, Health, RolloutPolicy, RolloutStatus, evaluate_gate, in_stage
from app.rollout.gate import check_gate
from app.rollout.store import change
from app.sweep.sweep import Sweeper
from tests.conftest import service_headers, wait_for
from tests.integration.test_rollout_ops import finished_sweep, history, remediation
from tests.integration.test_sweep import Recorder, corrupted, rollout_off, set_stage, sql  # noqa: F401

NOW = datetime.now(UTC)
IDS = st.lists(st.text(min_size=1, max_size=24), min_size=1, max_size=200, unique=True)


@given(ids=IDS, named=st.lists(st.text(min_size=1, max_size=24), max_size=5))
def test_off_takes_none_named_takes_exactly_the_named_and_each_step_back_shrinks(ids: list[str],
                                                                                 named: list[str]) -> None:
    members = {stage: {a for a in ids + named if in_stage(a, stage, named)} for stage in STAGES}
    assert members["off"] == set()
    assert members["named"] == set(named)
    for wider, narrower in zip(STAGES[1:], STAGES, strict=False):
        assert members[narrower] <= members[wider], (narrower, wider)


def test_a_breach_exactly_at_the_limit_is_inside_it_one_more_steps_back() -> None:
    """The limits are maxima: 2 reverted of 100 at a 2% limit, 5 errors at a limit of 5, are healthy."""
    state = RolloutStatus("25", False, NOW - timedelta(hours=30))
    limits = RolloutPolicy()
    at = evaluate_gate(state, Health(remediations=100, reverted=2, errors=5, sweeps=3), limits, NOW)
    assert at.action == "advance", at
    for over in (Health(remediations=100, reverted=3, errors=5, sweeps=3),
                 Health(remediations=100, reverted=2, errors=6, sweeps=3)):
        assert evaluate_gate(state, over, limits, NOW).action == "rollback", over


def _lock_waiters(engine: Engine) -> int:
    return int(sql(engine, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                           "AND query LIKE '%%rollout_state%%'")[0][0])


def _blocked_behind_the_rollout_row(engine: Engine, calls: list[Callable[[], Any]], waiters: int | None = None,
                                    *, in_turn: bool = False) -> list[Any]:
    """Run ``calls`` in threads while the rollout row is held, and let go once ``waiters`` of them
    wait on it (all of them by default). ``in_turn``: each call is started only once the one before
    waits on the row; PostgreSQL grants a row lock to its waiters in turn, so they take the row in
    the order given, each only after the one before committed."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as exc:  # reported by the assertions of the test
            results[i] = exc

    def waiting(n: int) -> Callable[[], bool]:
        return lambda: _lock_waiters(engine) >= n

    with engine.connect() as holder:
        tx = holder.begin()
        holder.exec_driver_sql("SELECT 1 FROM rollout_state WHERE id = 1 FOR UPDATE")
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
        for n, t in enumerate(threads, 1):
            t.start()
            if in_turn:
                wait_for(waiting(n), message=f"call {n} waiting on the rollout row")
        wait_for(waiting(len(calls) if waiters is None else waiters), message="the calls waiting on the rollout row")
        tx.commit()
    for t in threads:
        t.join(60)
    return results


def _advance_from(flask_app: Flask, stage: str, actor: str = "dana") -> Callable[[], Any]:
    """An operator's advance through POST /ops/rollout, decided from ``stage``."""
    def post() -> Any:
        with flask_app.test_client() as client:
            return client.post("/ops/rollout", headers=service_headers(),
                               json={"action": "advance", "from_stage": stage, "reason": "looks fine", "actor": actor})
    return post


def test_an_operators_advance_after_the_gates_from_the_same_stage_is_a_conflict_not_a_second_stage(
        runtime, engine: Engine, flask_app: Flask, rollout_off: None):
    """The gate, soaked and healthy at 5%, advances; the operator, who saw 5% and decided to widen,
    waits on the same row meanwhile. Both were decisions from 5%: the fleet goes to 10% once. Before,
    the operator's advance took the row after the gate's and widened 10% -> 25% with no soak at 10%
    (both audited, one stage skipped); now it changes nothing and answers 409 with why."""
    set_stage(engine, "5", entered=NOW - timedelta(hours=25))
    finished_sweep(engine, NOW - timedelta(hours=1))
    gate, operator = _blocked_behind_the_rollout_row(
        engine, [lambda: check_gate(engine, runtime.policy, NOW), _advance_from(flask_app, "5")], in_turn=True)
    assert not isinstance(gate, Exception) and gate[0].action == "advance", gate
    assert operator.status_code == 409, operator.json
    assert operator.json["error"] == "conflict"
    assert "at 10% now, not 5%" in operator.json["reason"] and "advance by gate" in operator.json["reason"]
    assert [(h.action, h.from_stage, h.to_stage, h.actor) for h in history(engine)] == [
        ("advance", "5", "10", "gate")]
    assert sql(engine, "SELECT stage FROM rollout_state")[0][0] == "10"
    assert sql(engine, "SELECT count(*) FROM audit_log WHERE action = 'rollout.advance'")[0][0] == 1


def test_the_gates_advance_after_an_operators_from_the_same_stage_changes_nothing(
        runtime, engine: Engine, flask_app: Flask, rollout_off: None):
    """The other order: the operator's advance takes the row first; the gate then decides from the
    stage it finds (10%, entered just now) and leaves it."""
    set_stage(engine, "5", entered=NOW - timedelta(hours=25))
    finished_sweep(engine, NOW - timedelta(hours=1))
    operator, gate = _blocked_behind_the_rollout_row(
        engine, [_advance_from(flask_app, "5"), lambda: check_gate(engine, runtime.policy, NOW)], in_turn=True)
    assert operator.status_code == 200 and operator.json["stage"] == "10", operator.json
    assert not isinstance(gate, Exception) and gate[0].action == "hold" and gate[2].stage == "10", gate
    assert [(h.action, h.from_stage, h.to_stage, h.actor) for h in history(engine)] == [
        ("advance", "5", "10", "service")]


def test_two_operators_advancing_from_the_same_stage_at_once_widen_it_once(
        runtime, engine: Engine, flask_app: Flask, rollout_off: None):
    """Two operators both saw 5% and both advance: whichever takes the row first widens to 10%, the
    other is told the rollout is at 10% now (409), whatever order they meet in."""
    set_stage(engine, "5", entered=NOW - timedelta(hours=2))
    results = _blocked_behind_the_rollout_row(
        engine, [_advance_from(flask_app, "5", "dana"), _advance_from(flask_app, "5%", "erin")], 2)
    assert sorted(r.status_code for r in results) == [200, 409], results
    [conflict] = [r for r in results if r.status_code == 409]
    assert "at 10% now, not 5%" in conflict.json["reason"]
    assert [(h.action, h.from_stage, h.to_stage) for h in history(engine)] == [("advance", "5", "10")]
    assert sql(engine, "SELECT stage FROM rollout_state")[0][0] == "10"


def test_two_gate_checks_at_once_advance_once(runtime, engine: Engine, rollout_off: None):
    set_stage(engine, "5", entered=NOW - timedelta(hours=25))
    finished_sweep(engine, NOW - timedelta(hours=1))
    results = _blocked_behind_the_rollout_row(
        engine, [lambda: check_gate(engine, runtime.policy, NOW)] * 2, 2)
    actions = sorted(r[0].action for r in results)
    assert actions == ["advance", "hold"], results
    assert [(h.action, h.from_stage, h.to_stage) for h in history(engine)] == [("advance", "5", "10")]
    assert sql(engine, "SELECT stage FROM rollout_state")[0][0] == "10"


def test_an_operators_rollback_racing_the_gate_ends_held_and_no_wider(runtime, engine: Engine, rollout_off: None):
    """The operator steps back while the gate, about to advance on healthy data, waits on the same
    row. Whichever takes the row first, the rollout ends held and no wider than the stage the
    operator saw: operator first, the gate sees the held lower stage and leaves it; gate first,
    the operator's step back undoes the gate's advance (and says so: "25% -> 10%")."""
    set_stage(engine, "10", entered=NOW - timedelta(hours=25))
    finished_sweep(engine, NOW - timedelta(hours=1))

    def operator() -> object:
        with engine.begin() as conn:
            return change(conn, "rollback", "ops:alice", "customers complain", NOW)

    results = _blocked_behind_the_rollout_row(
        engine, [operator, lambda: check_gate(engine, runtime.policy, NOW)], 2)
    assert not any(isinstance(r, Exception) for r in results), results
    state = sql(engine, "SELECT stage, held FROM rollout_state")[0]
    steps = [(h.action, h.from_stage, h.to_stage, h.actor) for h in history(engine)]
    assert steps in ([("rollback", "10", "5", "ops:alice")],
                     [("advance", "10", "25", "gate"), ("rollback", "25", "10", "ops:alice")]), steps
    assert state.held and state.stage == steps[-1][2]


def test_remediations_requested_at_the_stage_before_a_step_back_are_not_the_new_stages_health(
        runtime, engine: Engine, corrupted: dict[str, str]):
    """The gate steps back while a sweep page is between requesting its remediations (at the wider
    stage) and recording them. Those records are the wider stage's: counted in the lower stage's
    health, the same reverted remediations step it back again (and again), as the sweep errors'
    before_stage marking already prevents for errors."""
    named = [corrupted["paid"], corrupted["flagged"], corrupted["unpaid"]]
    set_stage(engine, "5", named, entered=NOW - timedelta(hours=30))
    stepped: list[str] = []

    def enqueue(account_id: str, run_id: int | None) -> str:
        if not stepped:  # the gate's step back lands after the page's requests, before its records
            with engine.begin() as conn:
                stepped.append(change(conn, "rollback", "gate", "reverted remediations", NOW)[1].stage)
        return "task"

    clock = iter([NOW + timedelta(seconds=s) for s in range(100)])
    report = Sweeper(engine, runtime.policy, enqueue, clock=lambda: next(clock)).start()
    assert report.enqueued == 3 and stepped == ["named"]
    assert sql(engine, "SELECT count(*) FROM drift_record WHERE remediated")[0][0] == 3
    _decision, health, _state = check_gate(engine, runtime.policy, NOW + timedelta(hours=1))
    assert health.remediations == 0, health


def test_a_sweep_clock_ahead_of_the_gates_does_not_bring_the_wider_stages_remediations_down(
        runtime, engine: Engine, rollout_off: None):
    """A sweep host whose clock runs minutes ahead stamps the wider stage's last remediations after
    the step back: they are still that stage's, not the lower one's."""
    set_stage(engine, "named", entered=NOW - timedelta(minutes=1))  # stepped back from 5% at NOW - 1 min
    sweep = finished_sweep(engine, NOW - timedelta(minutes=30))
    for n in range(10):
        remediation(engine, sweep, f"acct_{n}", NOW + timedelta(minutes=2), {"status": "bad_debt"})  # at 5%
    later = finished_sweep(engine, NOW + timedelta(minutes=10))
    for n in range(10):  # not taken yet: found drifted again at named, out of its stage
        remediation(engine, later, f"acct_{n}", NOW + timedelta(minutes=10), {"status": "bad_debt"}, False)
    decision, health, state = check_gate(engine, runtime.policy, NOW + timedelta(minutes=20))
    assert (health.remediations, health.reverted) == (0, 0), health
    assert decision.action != "rollback" and state.stage == "named", decision


def test_a_sweep_of_one_account_pages_in_segments_requests_each_in_stage_account_once(
        runtime, engine: Engine, corrupted: dict[str, str]):
    """One page per account and one segment per page (as beat chains them): each drifted account
    inside the stage gets exactly one DRIFT_DETECTED request and one send for the sweep; the one
    outside is recorded and counted, and nothing is requested for it."""
    named = [corrupted["paid"], corrupted["flagged"]]
    set_stage(engine, "named", named)
    recorder = Recorder()
    sweeper = Sweeper(engine, runtime.policy, recorder, batch_size=1)
    report = sweeper.start(max_seconds=0)
    segments = 1
    while not report.finished:
        assert report.run_id is not None
        report = sweeper.resume(report.run_id, max_seconds=0)
        segments += 1
    assert segments >= 6 and (report.scanned, report.drifted, report.in_stage, report.enqueued) == (6, 3, 2, 2)
    assert sorted(a for a, _ in recorder.sent) == sorted(named)
    requests = sql(engine, "SELECT account_id, trigger FROM recompute_request")
    assert sorted(tuple(r) for r in requests) == sorted((a, "DRIFT_DETECTED") for a in named)
    records = {r.account_id: (r.remediated, r.skipped) for r in sql(
        engine, "SELECT account_id, remediated, skipped FROM drift_record")}
    assert records == {corrupted["paid"]: (True, None), corrupted["flagged"]: (True, None),
                       corrupted["unpaid"]: (False, "out_of_stage")}
