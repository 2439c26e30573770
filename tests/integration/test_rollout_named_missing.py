# ruff: noqa: F811
"""The named stage whose named accounts do not exist (a typo, an account deleted) has exposed no one,
as the named stage with nobody named: the gate holds it there, saying which named ids have no account,
and naming such ids warns (it is no refusal: the account may be created later). Before, the gate
widened from it to 5% of real accounts after its soak and one completed sweep: no remediation, so
"health inside limits", on no evidence at all."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine

from app.cli import main
from app.db import unit_of_work
from app.rollout.gate import check_gate
from app.rollout.store import set_named_accounts
from tests.conftest import Accounts, service_headers
from tests.integration.test_rollout_ops import finished_sweep
from tests.integration.test_sweep import rollout_off, set_stage, sql  # noqa: F401

NOW = datetime.now(UTC)


def test_the_gate_holds_the_named_stage_when_no_named_account_exists(runtime, engine: Engine, rollout_off: None):
    set_stage(engine, "named", ["acct_typo", "acct_deleted"], entered=NOW - timedelta(hours=30))
    finished_sweep(engine, NOW - timedelta(hours=2))

    decision, health, state = check_gate(engine, runtime.policy, NOW)

    assert (health.remediations, health.errors, health.sweeps) == (0, 0, 1)
    assert (decision.action, state.stage) == ("hold", "named"), decision
    assert "none of the named accounts exists" in decision.reason
    assert "acct_deleted, acct_typo" in decision.reason
    assert state.last_gate_action == "hold" and state.last_gate_reason == decision.reason
    assert sql(engine, "SELECT count(*) FROM rollout_history")[0][0] == 0  # no stage change


def test_one_named_account_that_exists_lets_the_gate_advance(runtime, engine: Engine, rollout_off: None,
                                                            accounts: Accounts):
    real, _ = accounts.create()
    set_stage(engine, "named", ["acct_typo", real], entered=NOW - timedelta(hours=30))
    finished_sweep(engine, NOW - timedelta(hours=2))

    decision, _health, state = check_gate(engine, runtime.policy, NOW)

    assert (decision.action, state.stage) == ("advance", "5"), decision


def test_a_named_account_deleted_since_holds_the_stage_created_later_it_advances(runtime, engine: Engine,
                                                                                 rollout_off: None,
                                                                                 accounts: Accounts):
    gone, _ = accounts.create()
    set_stage(engine, "named", [gone], entered=NOW - timedelta(hours=30))
    finished_sweep(engine, NOW - timedelta(hours=2))
    sql(engine, "DELETE FROM subs_customer WHERE account_id = %(a)s", a=gone)
    sql(engine, "DELETE FROM subs_account WHERE account_id = %(a)s", a=gone)
    decision, _health, state = check_gate(engine, runtime.policy, NOW)
    assert (decision.action, state.stage) == ("hold", "named") and gone in decision.reason, decision

    accounts.create(gone)
    decision, _health, state = check_gate(engine, runtime.policy, NOW + timedelta(minutes=5))
    assert (decision.action, state.stage) == ("advance", "5"), decision


def test_a_held_or_breached_named_stage_is_decided_as_before(runtime, engine: Engine, rollout_off: None):
    """Only the widening waits for an existing named account: a breach still steps back."""
    set_stage(engine, "named", ["acct_typo"], entered=NOW - timedelta(hours=30))
    finished_sweep(engine, NOW - timedelta(hours=2), errors=6)
    decision, _health, state = check_gate(engine, runtime.policy, NOW)
    assert (decision.action, state.stage) == ("rollback", "off"), decision


def test_naming_accounts_that_do_not_exist_warns_on_the_command_line(cli_env: None, engine: Engine,
                                                                     rollout_off: None, accounts: Accounts,
                                                                     capsys: pytest.CaptureFixture[str]):
    real, _ = accounts.create()
    assert main(["rollout", "name", real, "acct_typo", "acct_gone", "--reason", "pilot", "--actor", "ops"]) == 0
    captured = capsys.readouterr()
    assert f"named accounts: {real}, acct_gone, acct_typo" in captured.out or \
        f"named accounts: acct_gone, acct_typo, {real}" in captured.out
    assert "warning: 2 named accounts do not exist (no subs_account row): acct_gone, acct_typo" in captured.err
    assert sql(engine, "SELECT named_accounts FROM rollout_state")[0][0] == sorted([real, "acct_typo", "acct_gone"])

    assert main(["rollout", "name", real, "--reason", "typos out", "--actor", "ops"]) == 0
    assert "warning" not in capsys.readouterr().err

    assert main(["rollout", "status"]) == 0
    assert "named accounts that do not exist" not in capsys.readouterr().out
    assert main(["rollout", "name", "acct_typo", "--reason", "oops", "--actor", "ops"]) == 0
    captured = capsys.readouterr()
    assert "warning: 1 named account does not exist (no subs_account row): acct_typo" in captured.err
    assert "none of the named accounts exists: the gate holds the named stage" in captured.err
    assert main(["rollout", "status"]) == 0
    assert "named accounts that do not exist: acct_typo" in capsys.readouterr().out


def test_naming_accounts_that_do_not_exist_warns_in_the_ops_answer(client, engine: Engine, rollout_off: None,
                                                                   accounts: Accounts):
    real, _ = accounts.create()
    answer = client.post("/ops/rollout", headers=service_headers(),
                         json={"action": "name", "accounts": [real, "acct_typo"], "reason": "pilot"})
    assert answer.status_code == 200, answer.json
    assert answer.json["named_accounts_missing"] == ["acct_typo"]
    assert answer.json["warnings"] == ["1 named account does not exist (no subs_account row): acct_typo"]
    view = client.get("/ops/rollout", headers=service_headers()).json
    assert view["named_accounts_missing"] == ["acct_typo"]

    fine = client.post("/ops/rollout", headers=service_headers(),
                       json={"action": "name", "accounts": [real], "reason": "typo out"})
    assert fine.status_code == 200 and fine.json["named_accounts_missing"] == [] and "warnings" not in fine.json


def test_the_warning_shows_a_long_list_briefly(engine: Engine, rollout_off: None):
    from app.rollout.store import missing_accounts, missing_warning

    with unit_of_work(engine) as conn:
        set_named_accounts(conn, [f"acct_typo_{n:02}" for n in range(30)], "ops", "many", NOW)
        missing = missing_accounts(conn, [f"acct_typo_{n:02}" for n in range(30)])
    assert len(missing) == 30
    warning = missing_warning(missing)
    assert warning.startswith("30 named accounts do not exist (no subs_account row): acct_typo_00, ")
    assert "acct_typo_09 and 20 more" in warning
