# ruff: noqa: F811
"""The rollout gate on health read from the real database, and how operators see and steer it:
`dunning rollout ...`, `dunning sweep`, GET/POST /ops/rollout, GET /ops/lifting."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from psycopg2.extras import Json
from sqlalchemy import Engine

from app import metrics
from app.cli import main
from app.rollout.gate import check_gate, measure
from app.rollout.store import change
from app.sweep.sweep import Sweeper
from tests.conftest import SERVICE_TOKEN, Accounts, service_headers

# The fixtures corrupted and rollout_off come from the sweep tests (pytest finds them by name here).
from tests.integration.test_sweep import Recorder, corrupted, rollout_off, set_stage, settle, sql  # noqa: F401

NOW = datetime.now(UTC)


def finished_sweep(engine: Engine, at: datetime, errors: int = 0) -> int:
    """A sweep that ran at ``at``, failing on ``errors`` accounts of its own."""
    with engine.begin() as conn:
        sweep = int(conn.exec_driver_sql(
            "INSERT INTO sweep_run (started_at, finished_at, updated_at, state, errors) "
            "VALUES (%(t)s, %(t)s, %(t)s, 'finished', %(e)s) RETURNING id", {"t": at, "e": errors}).scalar_one())
    sweep_errors(engine, sweep, at, [f"acct_failed_{sweep}_{n}" for n in range(errors)])
    return sweep


def sweep_errors(engine: Engine, sweep: int, at: datetime, accounts: list[str | None]) -> None:
    """Errors of sweep ``sweep`` at ``at``, one per account (None: an error not about one account)."""
    with engine.begin() as conn:
        for account in accounts:
            conn.exec_driver_sql("INSERT INTO sweep_error (sweep_id, account_id, kind, at) "
                                 "VALUES (%(s)s, %(a)s, 'compute', %(t)s)", {"s": sweep, "a": account, "t": at})


def remediation(engine: Engine, sweep: int, account: str, at: datetime, stored: dict[str, Any],
                remediated: bool = True, stage: str = "5") -> None:
    """A drift record; ``stage``: the one the remediation was requested at (the gate counts those of
    the current stage)."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO drift_record (sweep_id, account_id, found_at, stored, desired, fields, remediated, stage) "
            "VALUES (%(s)s, %(a)s, %(t)s, %(st)s, '{}', %(f)s, %(r)s, %(stage)s)",
            {"s": sweep, "a": account, "t": at, "st": Json(stored), "f": Json(list(stored)), "r": remediated,
             "stage": stage})


def history(engine: Engine) -> list[Any]:
    return sql(engine, "SELECT action, from_stage, to_stage, actor, reason, health FROM rollout_history ORDER BY id")


def test_gate_advances_after_soak_with_healthy_data(runtime, engine: Engine, rollout_off: None):
    set_stage(engine, "5", entered=NOW - timedelta(hours=25))
    sweep = finished_sweep(engine, NOW - timedelta(hours=2))
    for n in range(100):
        remediation(engine, sweep, f"acct_{n}", NOW - timedelta(hours=2), {"status": "bad_debt"})
    later = finished_sweep(engine, NOW - timedelta(hours=1))
    # one account drifted again the same way: 1 of 100 reverted, within the 2% limit
    remediation(engine, later, "acct_0", NOW - timedelta(hours=1), {"status": "bad_debt", "level": "x"}, False)
    # a different drift later (e.g. time moved the level) is not a revert
    remediation(engine, later, "acct_1", NOW - timedelta(hours=1), {"level": "notice"}, False)

    decision, health, state = check_gate(engine, runtime.policy, NOW)
    assert (health.remediations, health.reverted, health.errors, health.sweeps) == (100, 1, 0, 2)
    assert decision.action == "advance" and state.stage == "10" and not state.held
    assert state.last_gate_action == "advance"
    [entry] = history(engine)
    assert (entry.action, entry.from_stage, entry.to_stage, entry.actor) == ("advance", "5", "10", "gate")
    assert entry.health["remediations"] == 100 and "healthy" in entry.reason
    assert metrics.ROLLOUT_STAGE._value.get() == 3
    audit = sql(engine, "SELECT actor, action, detail FROM audit_log")
    assert [(a.actor, a.action, a.detail["to_stage"]) for a in audit] == [("gate", "rollout.advance", "10")]


def test_gate_holds_before_soak_and_records_why_without_changing_anything(runtime, engine: Engine,
                                                                          rollout_off: None):
    set_stage(engine, "5", entered=NOW - timedelta(hours=3))
    finished_sweep(engine, NOW - timedelta(hours=1))
    decision, _health, state = check_gate(engine, runtime.policy, NOW)
    assert decision.action == "hold" and "soaking" in decision.reason
    assert state.stage == "5" and state.last_gate_reason == decision.reason
    assert history(engine) == []


def test_a_later_drift_the_other_way_is_not_counted_as_reverted(runtime, engine: Engine, rollout_off: None):
    """A remediation that requested a revert (stored had none), then a drift the other way (stored
    has it, compute holds it now): not the same drift again. Under jsonb containment any list
    contains the empty one, and one such pair could roll a young stage back."""
    first = finished_sweep(engine, NOW - timedelta(hours=2))
    remediation(engine, first, "acct_a", NOW - timedelta(hours=2), {"actions_requested": []})
    later = finished_sweep(engine, NOW - timedelta(hours=1))
    remediation(engine, later, "acct_a", NOW - timedelta(hours=1), {"actions_requested": ["revert:in_1"]})
    remediation(engine, first, "acct_b", NOW - timedelta(hours=2), {"actions_requested": []})
    remediation(engine, later, "acct_b", NOW - timedelta(hours=1), {"actions_requested": []})  # the same again
    with engine.connect() as conn:
        health = measure(conn, NOW - timedelta(hours=3))
    assert (health.remediations, health.reverted) == (4, 1)


def test_gate_steps_back_and_holds_when_remediations_are_reverted(runtime, engine: Engine, rollout_off: None):
    set_stage(engine, "25", entered=NOW - timedelta(hours=3))
    first = finished_sweep(engine, NOW - timedelta(hours=2))
    for n in range(10):
        remediation(engine, first, f"acct_{n}", NOW - timedelta(hours=2), {"status": "bad_debt"}, stage="25")
    second = finished_sweep(engine, NOW - timedelta(hours=1))
    remediation(engine, second, "acct_3", NOW - timedelta(hours=1), {"status": "bad_debt"}, False, "25")
    with engine.begin() as conn:  # the remediation recompute of acct_7 failed
        conn.exec_driver_sql(
            "INSERT INTO subs_stuck_events (account_id, task_name, task_args, error_class, error, state, "
            "last_failed_at) VALUES ('acct_7', 'tasks.recompute_account', %(args)s, 'unexpected', 'boom', 'dead', "
            "%(t)s)", {"args": Json({"account_id": "acct_7", "trigger": "DRIFT_DETECTED"}),
                       "t": NOW - timedelta(minutes=30)})

    decision, health, state = check_gate(engine, runtime.policy, NOW)
    assert (health.remediations, health.reverted) == (10, 2)
    assert decision.action == "rollback" and "2 of 10" in decision.reason
    assert state.stage == "10" and state.held
    # the gate does not step back again on the same data: health restarts with the new stage
    again, health, state = check_gate(engine, runtime.policy, NOW + timedelta(minutes=5))
    assert again.action == "none" and state.stage == "10"
    assert [(h.action, h.from_stage, h.to_stage, h.actor) for h in history(engine)] == [
        ("rollback", "25", "10", "gate")]


def stuck_remediation(engine: Engine, account: str, state: str, failed_at: datetime,
                      resolved_at: datetime | None = None) -> None:
    """A DRIFT_DETECTED recompute of ``account`` in subs_stuck_events, as tasks.failures writes it."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO subs_stuck_events (account_id, task_name, task_args, error_class, error, attempts, state, "
            "last_failed_at, resolved_at) VALUES (%(a)s, 'tasks.recompute_account', %(args)s, 'lock_contention', "
            "'OperationalError: lock timeout', 2, %(state)s, %(t)s, %(r)s)",
            {"a": account, "args": Json({"account_id": account, "trigger": "DRIFT_DETECTED", "cause": "drift_sweep:1"}),
             "state": state, "t": failed_at, "r": resolved_at})


@pytest.mark.parametrize("state", ["resolved", "retrying"])
def test_a_remediation_recompute_that_is_not_dead_is_not_reverted(runtime, engine: Engine, rollout_off: None,
                                                                   state: str):
    """Reverted counts a remediation whose recompute failed: its stuck row is 'dead'. 'resolved' is
    a recompute that retried and then succeeded (the remediation took); 'retrying' has not failed
    yet (a passing failure beat re-drives), and should it never take, the next sweep finds the
    account drifted the same way, which counts."""
    set_stage(engine, "25", entered=NOW - timedelta(hours=30))
    first = finished_sweep(engine, NOW - timedelta(hours=2))
    for n in range(10):
        remediation(engine, first, f"acct_{n}", NOW - timedelta(hours=2), {"status": "bad_debt"})
    finished_sweep(engine, NOW - timedelta(hours=1))  # nothing drifted again
    failed = NOW - timedelta(hours=2) + timedelta(seconds=10)
    stuck_remediation(engine, "acct_3", state, failed,
                      failed + timedelta(seconds=30) if state == "resolved" else None)
    decision, health, state_after = check_gate(engine, runtime.policy, NOW)
    assert health.reverted == 0, health
    assert decision.action == "advance" and state_after.stage == "50", decision


def test_after_a_step_back_the_gate_steps_back_again_when_the_lower_stage_breaches(runtime, engine: Engine,
                                                                                   rollout_off: None):
    """A step back leaves the lower stage held, and remediation keeps running there: held stops the
    gate from advancing, not from stepping back. 25% breached -> 10% held; every remediation at
    10% reverted too -> 5%, still held."""
    set_stage(engine, "25", entered=NOW - timedelta(hours=3))
    first = finished_sweep(engine, NOW - timedelta(hours=2))
    for n in range(10):
        remediation(engine, first, f"acct_{n}", NOW - timedelta(hours=2), {"status": "bad_debt"}, stage="25")
    second = finished_sweep(engine, NOW - timedelta(hours=1))
    for n in range(10):
        remediation(engine, second, f"acct_{n}", NOW - timedelta(hours=1), {"status": "bad_debt"}, False, "25")
    decision, _health, state = check_gate(engine, runtime.policy, NOW)
    assert decision.action == "rollback" and (state.stage, state.held) == ("10", True)

    later = NOW + timedelta(hours=1)
    third = finished_sweep(engine, later - timedelta(minutes=40))
    for n in range(20, 40):
        remediation(engine, third, f"acct_{n}", later - timedelta(minutes=40), {"status": "bad_debt"}, stage="10")
    fourth = finished_sweep(engine, later - timedelta(minutes=20))
    for n in range(20, 40):
        remediation(engine, fourth, f"acct_{n}", later - timedelta(minutes=20), {"status": "bad_debt"}, False, "10")
    again, health, state = check_gate(engine, runtime.policy, later)
    assert (health.remediations, health.reverted) == (20, 20)
    assert again.action == "rollback" and "20 of 20" in again.reason, again
    assert (state.stage, state.held) == ("5", True)
    assert [(h.action, h.from_stage, h.to_stage) for h in history(engine)] == [
        ("rollback", "25", "10"), ("rollback", "10", "5")]


def test_an_operator_hold_does_not_turn_off_the_automatic_step_back(runtime, engine: Engine, rollout_off: None):
    """Hold = "stop the gate from advancing": a stage held for a weekend still steps back by itself
    when its sweeps log more errors than the limit, and stays held."""
    set_stage(engine, "50", entered=NOW - timedelta(hours=30))
    sql(engine, "UPDATE rollout_state SET held = true WHERE id = 1")
    sweep = finished_sweep(engine, NOW - timedelta(hours=1), errors=50)
    remediation(engine, sweep, "acct_x", NOW - timedelta(hours=1), {"status": "bad_debt"})
    decision, health, state = check_gate(engine, runtime.policy, NOW)
    assert health.errors == 50
    assert decision.action == "rollback" and "50 errors > limit 5" in decision.reason, decision
    assert (state.stage, state.held) == ("25", True)
    assert [(h.action, h.from_stage, h.to_stage, h.actor) for h in history(engine)] == [
        ("rollback", "50", "25", "gate")]


def test_a_held_healthy_stage_is_left_alone_past_its_soak(runtime, engine: Engine, rollout_off: None):
    """Held and within limits: the gate neither advances nor holds anew; it says it is held."""
    set_stage(engine, "10", entered=NOW - timedelta(hours=30))
    sql(engine, "UPDATE rollout_state SET held = true WHERE id = 1")
    sweep = finished_sweep(engine, NOW - timedelta(hours=1))
    remediation(engine, sweep, "acct_x", NOW - timedelta(hours=1), {"status": "bad_debt"})
    decision, _health, state = check_gate(engine, runtime.policy, NOW)
    assert decision.action == "none" and "held at 10%" in decision.reason, decision
    assert (state.stage, state.held) == ("10", True) and history(engine) == []


def test_gate_steps_back_on_errors(runtime, engine: Engine, rollout_off: None):
    set_stage(engine, "named", entered=NOW - timedelta(hours=30))
    finished_sweep(engine, NOW - timedelta(hours=1), errors=6)
    decision, _health, state = check_gate(engine, runtime.policy, NOW)
    assert decision.action == "rollback" and "6 errors > limit 5" in decision.reason
    assert state.stage == "off"


def test_errors_of_a_sweep_that_spans_a_step_back_do_not_step_back_again(runtime, engine: Engine,
                                                                         corrupted: dict[str, str]):
    """sweep_run.errors is the running total of a whole sweep: the errors a sweep had when the gate
    stepped back are the left stage's, and never push the gate back again from the next one."""
    policy = replace(runtime.policy, extra={**runtime.policy.extra, "rollout": {"max_errors": 1}})
    # the drifted accounts are named: in stage at 10% and at 5% alike
    set_stage(engine, "10", named=[corrupted[n] for n in ("paid", "unpaid", "flagged")],
              entered=NOW - timedelta(hours=30))

    def broken(account_id: str, run_id: int | None) -> str:
        raise TypeError("Object of type Decimal is not JSON serializable")  # (not the broker: no deferral)

    # The first segment (5 of the 6 accounts, at least 2 of them drifted) cannot enqueue anything.
    first = Sweeper(engine, policy, broken, batch_size=5,
                    clock=lambda: NOW - timedelta(minutes=10)).start(max_seconds=0)
    assert not first.finished and first.errors >= 2
    assert first.run_id is not None
    decision, health, state = check_gate(engine, policy, NOW - timedelta(minutes=9))
    assert decision.action == "rollback" and health.errors == first.errors
    assert (state.stage, state.held) == ("5", True)

    # Fixed: the sweep's last segment (at 5%) has no error, and the sweep finishes.
    rest = Sweeper(engine, policy, Recorder(), batch_size=5,
                   clock=lambda: NOW - timedelta(minutes=8)).resume(first.run_id)
    assert rest.finished and rest.errors == first.errors
    assert sql(engine, "SELECT state, errors FROM sweep_run")[0] == ("finished", first.errors)
    with engine.begin() as conn:
        change(conn, "resume", "ops", "the sending bug is understood", NOW - timedelta(minutes=5))

    again, health, state = check_gate(engine, policy, NOW)
    assert health.errors == 0, health
    assert again.action == "hold" and (state.stage, state.held) == ("5", False), again
    assert [(h.action, h.from_stage, h.to_stage) for h in history(engine)] == [
        ("rollback", "10", "5"), ("resume", "5", "5")]


def test_a_sweep_begun_before_the_stage_neither_charges_its_errors_nor_vouches_for_it(
        runtime, engine: Engine, rollout_off: None):
    policy = replace(runtime.policy, extra={**runtime.policy.extra, "rollout": {"soak_hours": 1}})
    set_stage(engine, "10", entered=NOW - timedelta(hours=30))
    with engine.begin() as conn:  # it finished just after the gate read its clock, before the check
        sweep = conn.exec_driver_sql(
            "INSERT INTO sweep_run (started_at, finished_at, updated_at, state, errors) "
            "VALUES (%(s)s, %(f)s, %(f)s, 'finished', 6) RETURNING id",
            {"s": NOW - timedelta(minutes=40), "f": NOW + timedelta(seconds=1)}).scalar_one()
    sweep_errors(engine, sweep, NOW + timedelta(seconds=1), [f"acct_{n}" for n in range(6)])
    first, health, state = check_gate(engine, policy, NOW)
    assert first.action == "rollback" and health.errors == 6 and state.stage == "5"
    with engine.begin() as conn:
        change(conn, "resume", "ops", "errors understood", NOW + timedelta(hours=1))

    # Soaked at 5%, not one error since, but no sweep has run at 5% from its start: health unknown.
    second, health, state = check_gate(engine, policy, NOW + timedelta(hours=2))
    assert (health.errors, health.sweeps) == (0, 0), health
    assert second.action == "hold" and "no completed sweep since 5% began" in second.reason
    assert state.stage == "5"


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_rollout_changes_need_a_reason_and_are_audited(cli_env: None, engine: Engine, rollout_off: None,
                                                           capsys: pytest.CaptureFixture[str]):
    assert main(["rollout", "advance"]) == 2
    assert "--reason TEXT is required" in capsys.readouterr().err
    assert main(["rollout", "advance", "--reason", "  "]) == 2
    assert sql(engine, "SELECT stage FROM rollout_state")[0][0] == "off"

    # an advance says the stage it was decided from, and changes nothing from any other
    assert main(["rollout", "advance", "--reason", "start", "--actor", "bob"]) == 2
    assert "an advance must say the stage it was decided from" in capsys.readouterr().err
    assert main(["rollout", "advance", "--from", "named", "--reason", "start", "--actor", "bob"]) == 2
    assert "the rollout is at off now, not named accounts as this advance was decided from" in capsys.readouterr().err
    assert main(["rollout", "advance", "--from", "fifty", "--reason", "start", "--actor", "bob"]) == 2
    assert "from_stage must be a stage (off, named accounts, 5%" in capsys.readouterr().err
    assert sql(engine, "SELECT stage FROM rollout_state")[0][0] == "off" and history(engine) == []

    assert main(["rollout", "advance", "--from", "off", "--reason", "start with our own accounts",
                 "--actor", "bob"]) == 0
    assert "advance: off -> named accounts; recorded by bob" in capsys.readouterr().out
    # a manual advance does not wait for the soak time
    assert main(["rollout", "advance", "--from", "named accounts", "--reason", "looks fine", "--actor", "bob"]) == 0
    assert main(["rollout", "hold", "--reason", "incident 42", "--actor", "carol"]) == 0
    assert main(["rollout", "hold", "--reason", "again", "--actor", "carol"]) == 2
    assert "already held" in capsys.readouterr().err
    assert main(["rollout", "rollback", "--reason", "false positives", "--actor", "carol"]) == 0
    assert main(["rollout", "rollback", "--reason", "all the way", "--actor", "carol"]) == 0
    assert main(["rollout", "rollback", "--reason", "further", "--actor", "carol"]) == 2
    assert "already off" in capsys.readouterr().err

    capsys.readouterr()
    assert main(["rollout", "status"]) == 0
    out = capsys.readouterr().out
    assert "stage: off (held)" in out
    assert "rollback      named -> off  by carol: all the way" in out
    assert "advance       off -> named  by bob: start with our own accounts" in out
    assert "health since the stage began: 0 remediations" in out
    assert [(h.action, h.actor) for h in history(engine)] == [
        ("advance", "bob"), ("advance", "bob"), ("hold", "carol"), ("rollback", "carol"), ("rollback", "carol")]
    assert sql(engine, "SELECT count(*) FROM audit_log WHERE action LIKE 'rollout.%%'")[0][0] == 5


def test_cli_sweep_dry_run_prints_counts_and_the_drifted_accounts(cli_env: None, engine: Engine,
                                                                  corrupted: dict[str, str],
                                                                  capsys: pytest.CaptureFixture[str]):
    set_stage(engine, "named", [corrupted["paid"]])
    assert main(["sweep", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run (nothing written, nothing enqueued) at stage named accounts" in out
    assert "scanned 6  drifted 3  in stage 1  out of stage 2  guarded 0  enqueued 0  deferred 0  errors 0" in out
    assert f"{corrupted['paid']}  [remediate]  status: 'bad_debt' -> 'current'" in out
    assert f"{corrupted['unpaid']}  [out_of_stage]  level: 'suspended' -> 'restrict_premium'" in out
    assert f"{corrupted['flagged']}  [out_of_stage]  bad_debt_flag: True -> False" in out
    assert sql(engine, "SELECT count(*) FROM sweep_run")[0][0] == 0


def test_cli_sweep_enqueues_and_says_so(cli_env: None, engine: Engine, corrupted: dict[str, str], settings,
                                        capsys: pytest.CaptureFixture[str]):
    set_stage(engine, "100")
    assert main(["sweep", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "scanned 6  drifted 3  in stage 3  out of stage 0  guarded 0  enqueued 3  deferred 0  errors 0" in out
    assert "drifted accounts (first 1 of 3):" in out
    queue = redis.Redis.from_url(settings.broker_url)
    try:  # the three DRIFT_DETECTED recomputes are on the queue
        messages = [json.loads(m) for m in queue.lrange(f"{settings.broker_key_prefix}recompute", 0, -1)]
    finally:
        queue.close()
    bodies = [json.loads(base64.b64decode(m["body"])) for m in messages]
    assert sorted(args[0] for args, _kwargs, _ in bodies) == sorted(corrupted[k] for k in ("paid", "unpaid", "flagged"))
    # sent coalesced, after the sweep stored each account's recompute request (54097d6)
    assert {(args[1], kwargs["coalesced"]) for args, kwargs, _ in bodies} == {("DRIFT_DETECTED", True)}
    assert {m["headers"]["task"] for m in messages} == {"tasks.recompute_account"}


# --- HTTP -----------------------------------------------------------------------------------------


def test_ops_rollout_requires_a_service_token(client, rollout_off: None):
    assert client.get("/ops/rollout").status_code == 401
    assert client.post("/ops/rollout", json={"action": "advance", "reason": "x"},
                       headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/ops/lifting").status_code == 401


@pytest.mark.parametrize("body, reason", [
    ("not json", "must be a JSON object"),
    ({"reason": "x"}, "action must be one of"),
    ({"action": "explode", "reason": "x"}, "action must be one of"),
    ({"action": "advance"}, "reason is required"),
    ({"action": "advance", "reason": "   "}, "reason is required"),
    ({"action": "advance", "reason": "x", "actor": 7}, "actor must be"),
    ({"action": "advance", "reason": "x", "actor": " "}, "actor must be"),
    ({"action": "advance", "reason": "x", "actor": "a\u0000b"}, "actor contains a NUL character"),
    ('{"action": "advance", "reason": "x", "actor": "\\udfff"}', "actor is not valid Unicode text"),
    ({"action": "advance", "reason": "x", "actor": "d" * 201}, "actor is too long"),
    ({"action": "name", "reason": "x", "accounts": "acct_1"}, "accounts must be a list"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"action": "hold", "reason": "\\ud800"}', "not valid Unicode text"),
    # jsonb refuses \u0000: PostgreSQL's DataError was a 500 "database error".
    ({"action": "name", "reason": "x", "accounts": ["acct_1", "a\u0000"]}, "NUL character"),
    ('{"action": "name", "reason": "x", "accounts": ["\\ud800"]}', "not valid Unicode text"),
])
def test_ops_rollout_rejects_bad_input_with_a_reason(client, engine: Engine, rollout_off: None, body: Any,
                                                     reason: str):
    kwargs: dict[str, Any] = ({"data": body, "content_type": "application/json"} if isinstance(body, str)
                              else {"json": body})
    response = client.post("/ops/rollout", headers=service_headers(), **kwargs)
    assert response.status_code == 400
    assert reason in response.json["reason"]
    assert history(engine) == []


@pytest.mark.parametrize("body", [
    {"action": "hold", "reason": "r" * 2001},
    {"action": "name", "reason": "r" * 2001, "accounts": ["acct_1"]},
], ids=["change", "name"])
def test_ops_rollout_answers_a_reason_too_long_with_400_not_409(client, engine: Engine, rollout_off: None,
                                                                 body: dict[str, Any]):
    """Bad input is a 400 with the reason; 409 is only for a change the current state does not
    allow. The store's own input checks (a reason over 2000 characters) are input errors too."""
    response = client.post("/ops/rollout", json=body, headers=service_headers())
    assert response.status_code == 400, response.json
    assert response.json["error"] == "bad_request"
    assert "reason is too long (at most 2000 characters)" in response.json["reason"]
    assert history(engine) == []
    assert sql(engine, "SELECT held FROM rollout_state")[0][0] is False


def test_cli_rollout_says_why_a_reason_too_long_is_refused(cli_env: None, engine: Engine, rollout_off: None,
                                                           capsys: pytest.CaptureFixture[str]):
    assert main(["rollout", "hold", "--reason", "r" * 2001]) == 2
    assert "error: a reason is too long (at most 2000 characters)" in capsys.readouterr().err
    assert history(engine) == []


def test_ops_rollout_steers_and_shows_the_rollout(client, engine: Engine, rollout_off: None):
    conflict = client.post("/ops/rollout", headers=service_headers(), json={"action": "rollback", "reason": "x"})
    assert conflict.status_code == 409 and "already off" in conflict.json["reason"]
    named = client.post("/ops/rollout", headers=service_headers(),
                        json={"action": "name", "accounts": ["acct_b", "acct_a", "acct_a"], "reason": "pilot",
                              "actor": "dana"})
    assert named.status_code == 200 and named.json["named_accounts"] == ["acct_a", "acct_b"]
    unsaid = client.post("/ops/rollout", headers=service_headers(),
                         json={"action": "advance", "reason": "pilot accounts", "actor": "dana"})
    assert unsaid.status_code == 400 and "must say the stage it was decided from" in unsaid.json["reason"]
    assert client.post("/ops/rollout", headers=service_headers(), json={
        "action": "advance", "from_stage": 5, "reason": "x"}).status_code == 400
    elsewhere = client.post("/ops/rollout", headers=service_headers(),
                            json={"action": "hold", "from_stage": "5%", "reason": "x"})
    assert elsewhere.status_code == 409 and "at off now, not 5%" in elsewhere.json["reason"]
    advanced = client.post("/ops/rollout", headers=service_headers(),
                           json={"action": "advance", "from_stage": "off", "reason": "pilot accounts", "actor": "dana"})
    assert advanced.status_code == 200
    assert advanced.json["stage"] == "named" and advanced.json["stage_label"] == "named accounts"
    client.post("/ops/rollout", headers=service_headers(), json={"action": "hold", "reason": "weekend"})
    resumed = client.post("/ops/rollout", headers=service_headers(), json={"action": "resume", "reason": "monday"})
    assert resumed.status_code == 200 and resumed.json["held"] is False
    view = client.get("/ops/rollout", headers=service_headers()).json
    assert view["stage"] == "named" and set(view["health"]) >= {"remediations", "reverted", "errors", "sweeps"}
    assert [(h["action"], h["actor"]) for h in view["history"]] == [
        ("resume", "service"), ("hold", "service"), ("advance", "service"), ("name_accounts", "service")]
    assert SERVICE_TOKEN not in str(view)


def test_ops_rollout_records_the_authenticated_principal_and_keeps_a_stated_actor_beside_it(
        client, engine: Engine, rollout_off: None):
    # The audit took the body's "actor" for who made the change: any holder of a service token could
    # write any name into rollout_history and audit_log, and the principal was lost.
    steps = [{"action": "name", "accounts": ["acct_a"], "reason": "pilot", "actor": "mallory"},
             {"action": "advance", "from_stage": "off", "reason": "go", "actor": " dana "},
             {"action": "hold", "reason": "wait", "actor": "service"},
             {"action": "resume", "reason": "on"}]
    for body in steps:
        assert client.post("/ops/rollout", headers=service_headers(), json=body).status_code == 200
    assert {h.actor for h in history(engine)} == {"service"}
    audit = sql(engine, "SELECT actor, action, detail FROM audit_log ORDER BY id")
    assert [(a.actor, a.action, a.detail.get("requested_by")) for a in audit] == [
        ("service", "rollout.name_accounts", "mallory"), ("service", "rollout.advance", "dana"),
        ("service", "rollout.hold", None), ("service", "rollout.resume", None)]


def test_a_named_service_token_puts_its_service_in_the_audit(client, engine: Engine, runtime, rollout_off: None,
                                                           monkeypatch):
    """SERVICE_TOKENS entries may be name:token: the change is the named service's, not "service"."""
    from app.config import parse_service_tokens

    named = "tok-ops-" + SERVICE_TOKEN
    tokens = parse_service_tokens(f"billing-ops:{named},{SERVICE_TOKEN}")
    monkeypatch.setattr(runtime, "settings", runtime.settings.with_overrides(service_tokens=tokens))
    as_ops = {"Authorization": f"Bearer {named}"}
    assert client.post("/ops/rollout", headers=as_ops, json={"action": "hold", "reason": "wait"}).status_code == 200
    assert client.post("/ops/rollout", headers=service_headers(),
                       json={"action": "resume", "reason": "on"}).status_code == 200
    assert [h.actor for h in history(engine)] == ["billing-ops", "service"]
    audit = sql(engine, "SELECT actor, action FROM audit_log ORDER BY id")
    assert [(a.actor, a.action) for a in audit] == [("billing-ops", "rollout.hold"), ("service", "rollout.resume")]


def test_ops_lifting_lists_accounts_stuck_past_the_guard_window(client, accounts: Accounts, runtime, engine: Engine):
    stuck, _ = accounts.create()
    fresh, _ = accounts.create()
    for account in (stuck, fresh):
        settle(engine, runtime.policy, account, NOW)
        sql(engine, "UPDATE subs_dunning SET status = 'lifting' WHERE account_id = %(a)s", a=account)
    for account, minutes in ((stuck, 45), (fresh, 5)):
        sql(engine, "INSERT INTO bad_debt_payment (account_id, idempotency_key, request_fingerprint, amount, state, "
                    "created_at) VALUES (%(a)s, %(k)s, 'fp', 5000, 'pending', now() - make_interval(mins => %(m)s))",
            a=account, k=f"key-{account}", m=minutes)
    response = client.get("/ops/lifting", headers=service_headers())
    assert response.status_code == 200
    assert response.json["count"] == 1 and response.json["guard_window_minutes"] == 30
    [item] = response.json["accounts"]
    assert item["account_id"] == stuck and 44 <= item["minutes"] <= 46
    assert item["reconciliation"] == {"checks": 0, "stripe_status": None, "next_check": None, "not_found_since": None}
    sql(engine, "UPDATE bad_debt_payment SET reconcile_checks = 2, stripe_status = 'processing' "
                "WHERE account_id = %(a)s", a=stuck)
    [item] = client.get("/ops/lifting", headers=service_headers()).json["accounts"]
    assert (item["reconciliation"]["checks"], item["reconciliation"]["stripe_status"]) == (2, "processing")
    assert metrics.STUCK_IN_LIFTING._value.get() == 1
    assert client.get("/ops/lifting?limit=0", headers=service_headers()).status_code == 400


@pytest.mark.parametrize("bad", ["0", "-5", "many"])
def test_cli_sweep_refuses_a_batch_size_that_is_not_a_positive_number(bad: str, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "--dry-run", "--batch-size", bad])
    assert exit_.value.code == 2
    assert f"--batch-size: must be a whole number of accounts, 1 or more (got {bad!r})" in capsys.readouterr().err


def test_naming_the_first_accounts_of_the_named_stage_starts_its_soak(runtime, engine: Engine, rollout_off: None,
                                                                      accounts: Accounts):
    """The named stage with nobody named has remediated no one (the gate holds it). Before, naming the
    first accounts there let the gate widen to 5% of real customers at its next check, 5 minutes
    later: the soak had run since the stage began, and the sweeps that vouched for it ran with
    nobody in it."""
    from app.db import unit_of_work
    from app.rollout.store import set_named_accounts

    accounts.create("acct_pilot")  # named accounts that exist (else the gate holds: rollout_named_missing)
    set_stage(engine, "named", entered=NOW - timedelta(days=3))
    finished_sweep(engine, NOW - timedelta(hours=2))
    decision, _health, state = check_gate(engine, runtime.policy, NOW - timedelta(hours=1))
    assert decision.action == "hold" and state.stage == "named"

    with unit_of_work(engine) as conn:
        set_named_accounts(conn, ["acct_pilot"], "ops", "pilot accounts", NOW - timedelta(minutes=5))
    decision, _health, state = check_gate(engine, runtime.policy, NOW)
    assert (decision.action, state.stage) == ("hold", "named"), decision
    assert state.stage_entered_at == NOW - timedelta(minutes=5)

    # The soak runs from the naming, and a sweep with the named accounts in it vouches for the stage.
    later = NOW + timedelta(hours=24)
    finished_sweep(engine, NOW + timedelta(hours=1))
    decision, _health, state = check_gate(engine, runtime.policy, later)
    assert (decision.action, state.stage) == ("advance", "5"), decision


def test_naming_other_accounts_at_the_named_stage_restarts_its_soak_the_same_or_fewer_do_not(
        runtime, engine: Engine, rollout_off: None, accounts: Accounts):
    """A named account not named before is new exposure: the stage starts again from the naming,
    as naming the first accounts does. Before, replacing a non-empty list kept the old soak, and the
    gate widened to 5% at its next check with the new accounts remediated for minutes. The same
    accounts again, or some of them taken out, expose no one new: the soak goes on. At a percentage
    stage naming does not restart it."""
    from app.db import unit_of_work
    from app.rollout.store import set_named_accounts

    def name(accounts: list[str], at: datetime) -> datetime:
        with unit_of_work(engine) as conn:
            return set_named_accounts(conn, accounts, "ops", "pilot", at).stage_entered_at

    for account in ("acct_a", "acct_b", "acct_c"):  # named accounts that exist
        accounts.create(account)
    set_stage(engine, "named", ["acct_a"], entered=NOW - timedelta(days=3))
    finished_sweep(engine, NOW - timedelta(hours=2))
    restarted = NOW - timedelta(minutes=5)
    assert name(["acct_b", "acct_a"], restarted) == restarted
    decision, _health, state = check_gate(engine, runtime.policy, NOW)
    assert (decision.action, state.stage) == ("hold", "named") and "soaking" in decision.reason, decision
    assert name(["acct_a", "acct_b", " acct_a "], NOW - timedelta(minutes=4)) == restarted  # the same set
    assert name(["acct_b"], NOW - timedelta(minutes=3)) == restarted  # one taken out
    again = NOW - timedelta(minutes=2)
    # errors of the sweeps before, stamped after the naming by a host whose clock runs ahead: not the
    # new soak's, as a stage change marks them
    sweep_errors(engine, finished_sweep(engine, NOW - timedelta(minutes=30)), again + timedelta(minutes=1),
                 [f"acct_failed_{n}" for n in range(6)])
    assert name(["acct_c"], again) == again  # one taken out, another named
    assert [(h.health["added"], h.health["removed"], h.health.get("stage_entered_at")) for h in history(engine)] == [
        (["acct_b"], [], restarted.isoformat()), ([], [], None), ([], ["acct_a"], None),
        (["acct_c"], ["acct_b"], again.isoformat())]

    # The soak runs from the last naming that exposed someone new, and a sweep since vouches for it.
    finished_sweep(engine, NOW + timedelta(hours=1))
    decision, _health, state = check_gate(engine, runtime.policy, again + timedelta(hours=23, minutes=59))
    assert (decision.action, state.stage) == ("hold", "named"), decision
    decision, _health, state = check_gate(engine, runtime.policy, again + timedelta(hours=24))
    assert (decision.action, state.stage) == ("advance", "5"), decision

    set_stage(engine, "10", ["acct_c"], entered=NOW - timedelta(hours=30))
    assert name(["acct_c", "acct_d"], NOW) == NOW - timedelta(hours=30)


def test_status_shows_control_characters_of_actors_reasons_and_accounts_escaped(cli_env, clean, capsys):
    """Reasons, actors (POST /ops/rollout's callers write them too) and named accounts (other teams'
    ids) went raw into the operator's terminal through `dunning rollout status`: an ANSI escape in one
    could clear the screen or rewrite the lines shown. Shown escaped (\\x1b), as the log does."""
    from app.cli import main

    assert main(["rollout", "name", "acct\x1b[2J", "--reason", "r\x1b[31mred\x07", "--actor", "a\x1b]0;t\x07"]) == 0
    capsys.readouterr()
    assert main(["rollout", "status"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out, out
    assert "acct\\x1b[2J" in out and "r\\x1b[31mred\\x07" in out and "a\\x1b]0;t\\x07" in out, out
