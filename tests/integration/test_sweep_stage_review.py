# ruff: noqa: F811
"""The rollout stage a sweep remediates at is the one in force when it remediates.

A sweep segment runs up to half the tasks' soft time limit (`dunning sweep` walks every account in
one go); an operator's rollback, the gate's step back or a change of the named accounts made while
it walks applies to the pages it has not remediated yet."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Engine

from app.db import unit_of_work
from app.rollout.store import change, set_named_accounts
from app.sweep.sweep import Sweeper
from tests.integration.test_sweep import corrupted, rollout_off, set_stage, sql  # noqa: F401


class OperatorDuring:
    """An enqueuer that records what it sends; after the first send, an operator (another process)
    changes the rollout while the sweep walks on."""

    def __init__(self, engine: Engine, act: str) -> None:
        self.engine = engine
        self.act = act
        self.sent: list[str] = []

    def __call__(self, account_id: str, run_id: int | None) -> str:
        self.sent.append(account_id)
        if len(self.sent) == 1:
            with unit_of_work(self.engine) as conn:
                now = datetime.now(UTC)
                if self.act == "rollback":
                    change(conn, "rollback", "dana", "false positives", now)
                else:
                    set_named_accounts(conn, [], "dana", "pilot over", now)
        return f"task-{len(self.sent)}"


def _walk_one_account_a_page(runtime, engine: Engine, corrupted: dict[str, str], act: str) -> OperatorDuring:
    drifted = [corrupted["paid"], corrupted["unpaid"], corrupted["flagged"]]
    set_stage(engine, "named", drifted)
    enqueue = OperatorDuring(engine, act)
    report = Sweeper(engine, runtime.policy, enqueue, batch_size=1).start()
    assert report.finished and report.drifted == 3
    return enqueue


def test_a_rollback_while_the_sweep_walks_stops_its_remediations(runtime, engine: Engine,
                                                                 corrupted: dict[str, str]):
    enqueue = _walk_one_account_a_page(runtime, engine, corrupted, "rollback")
    # named -> off after the first remediation: nothing more is remediated
    assert len(enqueue.sent) == 1
    records = sql(engine, "SELECT account_id, remediated, skipped, stage FROM drift_record ORDER BY id")
    assert [(r.remediated, r.skipped, r.stage) for r in records] == [
        (True, None, "named"), (False, "out_of_stage", "off"), (False, "out_of_stage", "off")]
    assert sql(engine, "SELECT count(*) FROM recompute_request")[0][0] == 1
    run = sql(engine, "SELECT in_stage, enqueued FROM sweep_run")[0]
    assert (run.in_stage, run.enqueued) == (1, 1)


def test_an_account_taken_off_the_named_list_while_the_sweep_walks_is_not_remediated(
        runtime, engine: Engine, corrupted: dict[str, str]):
    enqueue = _walk_one_account_a_page(runtime, engine, corrupted, "unname")
    assert len(enqueue.sent) == 1
    records = sql(engine, "SELECT remediated, skipped FROM drift_record ORDER BY id")
    assert [(r.remediated, r.skipped) for r in records] == [
        (True, None), (False, "out_of_stage"), (False, "out_of_stage")]
