# ruff: noqa: F811
"""Sweep errors recorded while the rollout stage changes are the stage before's, as the change says.

A page's errors are written with its records, in the page's own transaction, while the gate (or an
operator) may be changing the stage in another. The change marks every error so far before_stage;
an error written by a page that worked at the old stage must not come into the new stage's health
either way the two transactions meet: else the errors that stepped the rollout back (a send that
fails for every remediation of the page) step it back again from the stage below, and on down to
off. (A send the broker refuses is no error: test_rollout_broker_refused_remediation.py; these
sends fail otherwise, as a bug in sending would.)
"""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine

from app.rollout.gate import check_gate, measure
from app.rollout.store import change
from app.sweep.sweep import Sweeper
from tests.conftest import wait_for
from tests.integration.test_sweep import corrupted, rollout_off, set_stage, sql  # noqa: F401

NOW = datetime.now(UTC).replace(microsecond=0)
ONE_ERROR = {"rollout": {"max_errors": 1}}


def strict(policy: Any) -> Any:
    return replace(policy, extra={**policy.extra, **ONE_ERROR})


def at_10_percent(engine: Engine, corrupted: dict[str, str]) -> None:
    """The three drifted accounts named: inside the stage at 10% and at 5% alike."""
    set_stage(engine, "10", named=[corrupted[n] for n in ("paid", "unpaid", "flagged")],
              entered=NOW - timedelta(hours=30))


def rollback(engine: Engine) -> None:
    with engine.begin() as conn:
        change(conn, "rollback", "ops", "the remediations cannot be sent", NOW)


def errors_now(engine: Engine) -> int:
    with engine.connect() as conn:
        return measure(conn, NOW).errors


def waiting_on_locks(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                        "AND datname = current_database()").scalar_one())


def test_errors_of_a_page_whose_stage_changed_before_they_were_written_are_the_old_stages(
        runtime, engine: Engine, corrupted: dict[str, str]):
    """The page's remediations were requested at 10%; the rollback commits while their sends fail;
    the page's errors are written after it."""
    at_10_percent(engine, corrupted)
    refused: list[str] = []

    def send_fails(account_id: str, run_id: int | None) -> str:
        if not refused:
            rollback(engine)
        refused.append(account_id)
        raise TypeError("Object of type Decimal is not JSON serializable")

    report = Sweeper(engine, runtime.policy, send_fails, clock=lambda: NOW + timedelta(seconds=1)).start()
    assert report.finished and report.errors == 3 and len(refused) == 3
    assert sql(engine, "SELECT stage FROM rollout_state")[0][0] == "5"
    assert len(sql(engine, "SELECT 1 FROM sweep_error")) == 3  # recorded, for the sweep's record

    assert errors_now(engine) == 0
    decision, health, state = check_gate(engine, strict(runtime.policy), NOW + timedelta(seconds=2))
    assert health.errors == 0, health
    assert decision.action != "rollback" and state.stage == "5", decision


def test_errors_written_while_the_stage_changes_are_the_old_stages(runtime, engine: Engine,
                                                                   corrupted: dict[str, str]):
    """The page has written its errors and not committed yet (it waits on its sweep_run row) when the
    rollback marks the errors so far: they must be marked too, not committed after it unmarked."""
    at_10_percent(engine, corrupted)
    holder = engine.connect()
    holder.begin()

    def send_fails(account_id: str, run_id: int | None) -> str:
        # Someone holds the sweep's row for a moment: the page's transaction will wait on it.
        holder.exec_driver_sql("SELECT 1 FROM sweep_run WHERE id = %(id)s FOR UPDATE", {"id": run_id})
        raise TypeError("Object of type Decimal is not JSON serializable")

    sweeper = Sweeper(engine, runtime.policy, send_fails, clock=lambda: NOW + timedelta(seconds=1))
    outcome: dict[str, Any] = {}

    def sweep() -> None:
        outcome["report"] = sweeper.start()

    def roll_back() -> None:
        rollback(engine)
        outcome["rolled_back"] = True

    threads = [threading.Thread(target=sweep), threading.Thread(target=roll_back)]
    try:
        threads[0].start()
        wait_for(lambda: waiting_on_locks(engine) == 1, message="the page's transaction waiting")
        threads[1].start()
        wait_for(lambda: outcome.get("rolled_back") or waiting_on_locks(engine) == 2,
                 message="the rollback done or waiting")
    finally:
        holder.rollback()
        holder.close()
        for t in threads:
            t.join(30)
    assert outcome["rolled_back"] and outcome["report"].errors == 3
    assert sql(engine, "SELECT stage FROM rollout_state")[0][0] == "5"

    assert errors_now(engine) == 0
    decision, health, state = check_gate(engine, strict(runtime.policy), NOW + timedelta(seconds=2))
    assert health.errors == 0, health
    assert decision.action != "rollback" and state.stage == "5", decision
