# ruff: noqa: F811
"""An account whose rows cannot be built into a snapshot is one sweep error, not the end of every
sweep: the accounts after it are still read, compared and remediated."""

from __future__ import annotations

from sqlalchemy import Engine

from app.sweep.sweep import Sweeper
from tests.integration.test_sweep import Recorder, corrupted, rollout_off, set_stage, sql  # noqa: F401


def test_a_stored_state_edited_into_a_shape_no_recompute_writes_is_an_error_of_its_account_only(
        runtime, engine: Engine, corrupted: dict[str, str]):
    # By hand (a reason without its rule): the recompute of this account fails on it as well, dead
    # for an operator; the sweep failed on the page instead, every 15 minutes, at the same account.
    broken = min(corrupted.values())
    sql(engine, "UPDATE subs_dunning SET reasons = '[{\"detail\": \"edited by hand\"}]' WHERE account_id = %(a)s",
        a=broken)
    set_stage(engine, "100")
    recorder = Recorder()
    report = Sweeper(engine, runtime.policy, recorder, batch_size=2).start()

    assert report.finished and report.scanned == 6 and report.errors == 1
    drifted = {corrupted["paid"], corrupted["unpaid"], corrupted["flagged"]} - {broken}
    assert {a for a, _ in recorder.sent} == drifted and report.enqueued == len(drifted)
    run = sql(engine, "SELECT state, scanned, errors FROM sweep_run")[0]
    assert tuple(run) == ("finished", 6, 1)
