# ruff: noqa: F811
"""A dry run (`dunning sweep --dry-run`) counts nothing in the fleet's sweep counters.

It changes nothing and records nothing (no sweep_run, no drift_record, no sweep_error), yet it counted
its drift in dunning_drift_found_total (and its errors in dunning_sweep_errors_total) all the same:
with PROMETHEUS_MULTIPROC_DIR set in the operator's shell (the Procfile's folder, to see a real
sweep's counts), a preview joined the fleet's totals, and every one looked like the fleet's sweeps
finding the same drift again (DESIGN 9: drift found/remediated, by the sweeps). What a dry run found
is its output.
"""

from __future__ import annotations

from sqlalchemy import Engine

from app.cli import main
from app.sweep.sweep import Sweeper
from tests.integration.test_drift_counters import counted
from tests.integration.test_rollout_errors_by_account import unreadable
from tests.integration.test_sweep import corrupted, refuse, rollout_off, set_stage, sql  # noqa: F401


def test_a_dry_run_counts_no_drift_and_no_error_in_the_fleets_counters(
        runtime, engine: Engine, corrupted: dict[str, str]):
    set_stage(engine, "named", named=[corrupted["paid"]])
    unreadable(engine, corrupted["ok_other"])
    before = counted()
    report = Sweeper(engine, runtime.policy, refuse, dry_run=True).start()
    assert (report.drifted, report.in_stage, report.errors) == (3, 1, 1), report.to_json()
    assert counted() == before
    assert sql(engine, "SELECT count(*) FROM sweep_run")[0][0] == 0

    # The same accounts swept for real are counted: found (in stage and not), remediated, the error.
    swept = Sweeper(engine, runtime.policy, lambda account, run: f"task-{account}").start()
    assert (swept.drifted, swept.in_stage, swept.enqueued, swept.errors) == (3, 1, 1, 1), swept.to_json()
    after = counted()
    assert tuple(a - b for a, b in zip(after, before, strict=True)) == (1, 2, 1, 1)


def test_the_dry_run_command_counts_nothing(cli_env: None, engine: Engine, corrupted: dict[str, str], capsys):
    set_stage(engine, "100")
    before = counted()
    assert main(["sweep", "--dry-run"]) == 0
    assert "scanned 6  drifted 3  in stage 3" in capsys.readouterr().out
    assert counted() == before
