# ruff: noqa: F811
"""A rollout change applies only to the visit of the stage it was decided on (the ABA case): a
rollout that left 10% and came back to it is on another visit of 10%, with a soak of its own, and an
advance decided "from 10" on the earlier visit (an operator's stale command, a gate decision made
before the round trip) must not skip it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import Engine

from app.cli import main
from app.domain.rollout import evaluate_gate, rollout_policy
from app.rollout.gate import check_gate, measure
from app.rollout.store import RolloutError, RolloutRow, change, read_state
from app.sweep.sweep import Sweeper
from tests.conftest import service_headers
from tests.integration.test_rollout_ops import finished_sweep, history
from tests.integration.test_sweep import corrupted, rollout_off, set_stage, sql  # noqa: F401

NOW = datetime.now(UTC)


def _status(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    capsys.readouterr()
    assert main(["rollout", "status", "--json"]) == 0
    return dict(json.loads(capsys.readouterr().out))


def _round_trip(runtime, engine: Engine) -> None:
    """10% soaked and healthy: the gate advances to 25%, and bob steps back to 10% (held) a minute
    later, on false positives he saw at 25%."""
    decision, _health, state = check_gate(engine, runtime.policy, NOW)
    assert (decision.action, state.stage) == ("advance", "25"), decision
    with engine.begin() as conn:
        change(conn, "rollback", "ops:bob", "false positives at 25%", NOW + timedelta(minutes=1), from_stage="25")


def test_an_advance_decided_on_an_earlier_visit_of_the_stage_is_refused_through_the_cli(
        runtime, cli_env: None, engine: Engine, rollout_off: None, capsys: pytest.CaptureFixture[str]):
    """Alice looked at the rollout at 10%, soaked for a day, and decided to widen. Meanwhile the gate
    widened to 25% and bob stepped back to 10%: her `advance --from 10` took the new visit of 10%
    to 25% at once (held cleared), its soak skipped, 25% back on the false positives bob just saw.
    Now the stage alone is refused once 10% was left and come back to (it cannot say which visit),
    and her revision, from before the round trip, too; the revision of this visit works."""
    set_stage(engine, "10", entered=NOW - timedelta(hours=25))
    finished_sweep(engine, NOW - timedelta(hours=1))
    seen = _status(capsys)
    assert seen["stage"] == "10"
    _round_trip(runtime, engine)

    assert main(["rollout", "advance", "--from", "10", "--reason", "10% soaked a day", "--actor", "alice"]) == 2
    err = capsys.readouterr().err
    assert "error: the rollout left 10% and came back to it (advance 10% -> 25% by gate at " in err, err
    assert "rollback 25% -> 10% by ops:bob at " in err
    state = read_state_now(engine)
    assert f"--revision {state.revision}" in err and "nothing changed" in err
    assert (state.stage, state.held) == ("10", True)

    assert main(["rollout", "advance", "--from", "10", "--revision", str(seen["revision"]),
                 "--reason", "10% soaked a day", "--actor", "alice"]) == 2
    err = capsys.readouterr().err
    assert f"the rollout left 10% and came back to it since revision {seen['revision']} this advance was " in err
    assert "this is another visit of 10%" in err and f"(revision {state.stage_revision})" in err
    assert [(h.action, h.from_stage, h.to_stage, h.actor) for h in history(engine)] == [
        ("advance", "10", "25", "gate"), ("rollback", "25", "10", "ops:bob")]

    # A resume lets the gate widen again: the stage alone does not say which visit it was decided on either.
    assert main(["rollout", "resume", "--from", "10", "--reason", "understood", "--actor", "alice"]) == 2
    assert "the rollout left 10% and came back to it" in capsys.readouterr().err

    # Looked at again: status says the revision to decide from, and that one is taken.
    capsys.readouterr()
    assert main(["rollout", "status"]) == 0
    out = capsys.readouterr().out
    assert f"stage: 10% (held) since {state.stage_entered_at.isoformat()}, revision {state.revision}" in out
    assert f"change it from here with: --from 10 --revision {state.revision}" in out
    assert main(["rollout", "advance", "--from", "10%", "--revision", str(state.revision),
                 "--reason", "bob's false positives fixed", "--actor", "alice"]) == 0
    assert f"advance: 10% -> 25%; recorded by alice; revision {state.revision + 1}" in capsys.readouterr().out


def read_state_now(engine: Engine) -> RolloutRow:
    with engine.connect() as conn:
        return read_state(conn)


def test_a_gate_decision_made_before_the_round_trip_is_not_applied_to_the_new_visit(
        runtime, engine: Engine, rollout_off: None):
    """The gate's decision carries the revision it was decided at, and its change is made at that
    revision only: decided "advance from 10%" on the earlier visit, it changes nothing on the next."""
    set_stage(engine, "10", entered=NOW - timedelta(hours=25))
    finished_sweep(engine, NOW - timedelta(hours=1))
    limits = rollout_policy(runtime.policy.extra)
    with engine.connect() as conn:
        before = read_state(conn)
        decided = evaluate_gate(before.status, measure(conn, NOW - timedelta(hours=24), "10"), limits, NOW)
    assert decided.action == "advance" and decided.revision == before.revision
    _round_trip(runtime, engine)
    with pytest.raises(RolloutError, match="left 10% and came back to it since revision"), engine.begin() as conn:
        change(conn, decided.action, "gate", decided.reason, NOW + timedelta(minutes=2), from_stage="10",
               revision=decided.revision)
    assert sql(engine, "SELECT stage, held FROM rollout_state")[0] == ("10", True)


def test_ops_rollout_takes_the_revision_and_refuses_a_stale_one(
        runtime, client, engine: Engine, rollout_off: None):
    set_stage(engine, "10", entered=NOW - timedelta(hours=25))
    finished_sweep(engine, NOW - timedelta(hours=1))
    seen = client.get("/ops/rollout", headers=service_headers()).json
    _round_trip(runtime, engine)
    body = {"action": "advance", "from_stage": "10", "reason": "soaked", "revision": seen["revision"]}
    stale = client.post("/ops/rollout", headers=service_headers(), json=body)
    assert stale.status_code == 409 and "left 10% and came back to it since revision" in stale.json["reason"]
    for bad in ("7", True, 1.5, -1):
        answer = client.post("/ops/rollout", headers=service_headers(), json={**body, "revision": bad})
        assert answer.status_code == 400 and "revision must be" in answer.json["reason"], (bad, answer.json)
    now = client.get("/ops/rollout", headers=service_headers()).json
    assert now["stage_revision"] == now["revision"] and now["revision"] == seen["revision"] + 2
    held = client.post("/ops/rollout", headers=service_headers(),
                       json={"action": "hold", "reason": "x", "revision": now["revision"]})
    assert held.status_code == 409 and "already held" in held.json["reason"]
    fresh = client.post("/ops/rollout", headers=service_headers(), json={**body, "revision": now["revision"]})
    assert fresh.status_code == 200 and fresh.json["stage"] == "25", fresh.json


def test_a_sweep_page_across_a_round_trip_brings_nothing_into_the_new_visit_the_gate_task_measures(
        runtime, engine: Engine, corrupted: dict[str, str], celery_app: Celery, worker: Any):
    """A sweep page at 10% requests its remediations; before it records them (and the error of the
    one whose send failed), the rollout goes 10% -> 25% -> 10%. Those are the earlier visit's, as
    they would be the stage before's at any other stage change. Tied to the stage by its name, the
    page's remediations counted in the new visit's health (its reverted share could step it back,
    its count vouch for min_remediations) and its error was not marked before_stage."""
    named = [corrupted["paid"], corrupted["flagged"], corrupted["unpaid"]]
    set_stage(engine, "10", named, entered=NOW - timedelta(hours=30))
    trips: list[str] = []

    def enqueue(account_id: str, run_id: int | None) -> str:
        if not trips:  # the round trip lands between the page's requests and its records
            with engine.begin() as conn:
                trips.append(change(conn, "advance", "gate", "healthy", NOW, from_stage="10")[1].stage)
            with engine.begin() as conn:
                trips.append(change(conn, "rollback", "ops:bob", "too soon", NOW + timedelta(seconds=1),
                                    from_stage="25")[1].stage)
        if account_id == corrupted["unpaid"]:
            raise TypeError("Object of type Decimal is not JSON serializable")  # not the broker: an error
        return "task"

    clock = iter([NOW + timedelta(seconds=s) for s in range(2, 100)])
    report = Sweeper(engine, runtime.policy, enqueue, clock=lambda: next(clock)).start()
    assert trips == ["25", "10"] and (report.enqueued, report.errors) == (2, 1), report
    assert sql(engine, "SELECT count(*) FROM drift_record WHERE remediated AND stage = '10'")[0][0] == 2
    gate = celery_app.send_task("tasks.check_rollout_gate").get(timeout=30)
    assert gate["stage"] == "10" and gate["held"], gate
    assert (gate["health"]["remediations"], gate["health"]["errors"]) == (0, 0), gate


def test_an_advance_decided_before_a_colleagues_hold_on_the_same_visit_says_what_changed(
        cli_env: None, engine: Engine, rollout_off: None, capsys: pytest.CaptureFixture[str]):
    """The same visit, but carol held it after alice looked: alice's advance (which clears a hold)
    decided at the revision before is refused, naming the hold; the stage alone would take it."""
    set_stage(engine, "10", entered=NOW - timedelta(hours=25))
    seen = _status(capsys)
    assert main(["rollout", "hold", "--from", "10", "--reason", "incident 42", "--actor", "carol"]) == 0
    capsys.readouterr()
    assert main(["rollout", "advance", "--from", "10", "--revision", str(seen["revision"]), "--reason", "soaked",
                 "--actor", "alice"]) == 2
    err = capsys.readouterr().err
    assert (f"error: the rollout changed since revision {seen['revision']} this advance was decided at "
            "(hold at 10% by carol at ") in err, err
    assert f"it is at 10% (held), revision {int(str(seen['revision'])) + 1}; nothing changed" in err
    assert sql(engine, "SELECT stage, held FROM rollout_state")[0] == ("10", True)
    with pytest.raises(SystemExit) as exit_:
        main(["rollout", "advance", "--from", "10", "--revision", "-1", "--reason", "x"])
    assert exit_.value.code == 2
    assert "argument --revision: must be the rollout's revision" in capsys.readouterr().err
