# ruff: noqa: F811
"""Naming the accounts of the 'named accounts' stage says where it was decided, as the other rollout
changes do: `from_stage` / `revision` in POST /ops/rollout {"action": "name"}, `--from` / `--revision`
on `dunning rollout name`. Before, naming had no check: of two operators naming at once the last
list won silently, and a naming meant for the named stage that landed right after the gate widened
to 5% changed the running 5% stage (the new accounts remediated there) without restarting any soak."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from app.cli import main
from app.db import unit_of_work
from app.rollout.gate import check_gate
from app.rollout.store import RolloutError, set_named_accounts
from tests.conftest import Accounts, service_headers
from tests.integration.test_rollout_ops import finished_sweep
from tests.integration.test_sweep import rollout_off, set_stage, sql  # noqa: F401

NOW = datetime.now(UTC)


def named(engine: Engine) -> list[str]:
    return list(sql(engine, "SELECT named_accounts FROM rollout_state")[0][0])


def name_via_http(client: Any, accounts: list[str], **checks: Any) -> Any:
    return client.post("/ops/rollout", headers=service_headers(),
                       json={"action": "name", "accounts": accounts, "reason": "pilot", **checks})


def revision(client: Any) -> int:
    return int(client.get("/ops/rollout", headers=service_headers()).json["revision"])


def test_two_operators_naming_at_once_the_second_is_refused_not_silently_lost(client, engine: Engine,
                                                                              rollout_off: None):
    set_stage(engine, "named", ["acct_a"], entered=NOW - timedelta(hours=2))
    seen = revision(client)  # both operators looked at the rollout at this revision
    first = name_via_http(client, ["acct_a", "acct_b"], revision=seen, from_stage="named")
    assert first.status_code == 200, first.json
    assert first.json["revision"] == seen + 1
    second = name_via_http(client, ["acct_a", "acct_c"], revision=seen, from_stage="named")
    assert second.status_code == 409, second.json
    assert f"since revision {seen} this naming was decided at" in second.json["reason"]
    assert "name_accounts" in second.json["reason"]  # what changed meanwhile
    assert named(engine) == ["acct_a", "acct_b"]
    # Decided again at the current revision, it is made.
    again = name_via_http(client, ["acct_a", "acct_b", "acct_c"], revision=seen + 1)
    assert again.status_code == 200 and again.json["named_accounts"] == ["acct_a", "acct_b", "acct_c"]


def test_naming_meant_for_the_named_stage_is_refused_once_the_gate_widened_to_5(runtime, client, engine: Engine,
                                                                                 rollout_off: None,
                                                                                 accounts: Accounts):
    accounts.create("acct_a")  # a named account that exists: the gate widens from the named stage
    set_stage(engine, "named", ["acct_a"], entered=NOW - timedelta(days=3))
    seen = revision(client)
    finished_sweep(engine, NOW - timedelta(hours=2))
    decision, _health, state = check_gate(engine, runtime.policy, NOW)  # the gate widens meanwhile
    assert (decision.action, state.stage) == ("advance", "5"), decision
    entered = state.stage_entered_at

    late = name_via_http(client, ["acct_a", "acct_new"], from_stage="named")
    assert late.status_code == 409, late.json
    assert "the rollout is at 5% now, not named accounts as this naming was decided from" in late.json["reason"]
    stale = name_via_http(client, ["acct_a", "acct_new"], revision=seen)
    assert stale.status_code == 409 and "at 5%" in stale.json["reason"], stale.json
    assert named(engine) == ["acct_a"]
    after = client.get("/ops/rollout", headers=service_headers()).json
    assert after["stage"] == "5" and after["stage_entered_at"] == entered.isoformat()
    assert sql(engine, "SELECT count(*) FROM rollout_history WHERE action = 'name_accounts'")[0][0] == 0

    # Naming decided at 5% is made there (and, as before, does not restart its soak).
    at_five = name_via_http(client, ["acct_a", "acct_new"], from_stage="5%", revision=after["revision"])
    assert at_five.status_code == 200 and at_five.json["named_accounts"] == ["acct_a", "acct_new"]


def test_the_store_refuses_a_naming_decided_elsewhere(engine: Engine, rollout_off: None):
    set_stage(engine, "5", ["acct_a"])
    with (pytest.raises(RolloutError, match="not named accounts as this naming was decided from"),
          unit_of_work(engine) as conn):
        set_named_accounts(conn, ["acct_b"], "ops", "pilot", NOW, from_stage="named")
    assert named(engine) == ["acct_a"]


@pytest.mark.parametrize(("checks", "says"), [
    ({"from_stage": 5}, "from_stage must be a stage"),
    ({"from_stage": "fifty"}, "from_stage must be a stage (off, named accounts, 5%"),
    ({"revision": "3"}, "revision must be the rollout's revision"),
    ({"revision": True}, "revision must be the rollout's revision"),
    ({"revision": -1}, "revision must be the rollout's revision"),
])
def test_naming_with_a_bad_check_is_a_400_saying_why(client, engine: Engine, rollout_off: None,
                                                     checks: dict[str, Any], says: str):
    answer = name_via_http(client, ["acct_b"], **checks)
    assert answer.status_code == 400, answer.json
    assert says in answer.json["reason"]
    assert named(engine) == []


def test_cli_naming_says_why_a_stale_one_is_refused(cli_env: None, client, engine: Engine, rollout_off: None,
                                                    capsys: pytest.CaptureFixture[str]):
    set_stage(engine, "named", ["acct_a"])
    seen = revision(client)
    assert main(["rollout", "name", "acct_a", "acct_b", "--from", "named", "--revision", str(seen),
                 "--reason", "pilot", "--actor", "bob"]) == 0
    out = capsys.readouterr().out
    assert "named accounts: acct_a, acct_b; recorded by bob" in out and f"revision {seen + 1}" in out
    assert main(["rollout", "name", "acct_c", "--revision", str(seen), "--reason", "pilot", "--actor", "carol"]) == 2
    err = capsys.readouterr().err
    # acct_b was new exposure at the named stage: that naming started the stage again
    assert f"error: the named accounts stage started again since revision {seen} this naming was decided at" in err
    assert main(["rollout", "name", "acct_c", "--from", "5%", "--reason", "pilot", "--actor", "carol"]) == 2
    assert "the rollout is at named accounts now, not 5% as this naming was decided from" in capsys.readouterr().err
    assert named(engine) == ["acct_a", "acct_b"]
