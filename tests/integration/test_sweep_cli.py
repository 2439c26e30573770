# ruff: noqa: F811
"""`dunning sweep`: the exit status says whether the sweep had errors, whatever the output format.

Rule: a sweep with errors (compute failures, unreadable rows) exits 1, with ``--json`` as without
it (before, ``--json`` exited 0: a script reading JSON took a failed sweep for a clean one). A
remediation the broker refused is no error: deferred, its request waits for beat's re-drive.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine

from app.cli import main
from tests.integration.test_sweep import corrupted, rollout_off, set_stage  # noqa: F401


@pytest.mark.parametrize("output", [["--json"], []], ids=["json", "text"])
def test_a_sweep_with_errors_exits_1_in_either_output_format(cli_env: None, engine: Engine,
                                                             corrupted: dict[str, str], output: list[str],
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]):
    from app.sweep import sweep as sweep_module

    set_stage(engine, "100")

    def compute_fails(*args, **kwargs):
        raise RuntimeError("a bug in compute")

    monkeypatch.setattr(sweep_module, "compute", compute_fails)  # every account an error
    assert main(["sweep", *output]) == 1
    out = capsys.readouterr().out
    if output:
        report = json.loads(out)
        assert (report["errors"], report["enqueued"]) == (6, 0)
    else:
        assert "enqueued 0  deferred 0  errors 6" in out


@pytest.mark.parametrize("output", [["--json"], []], ids=["json", "text"])
def test_a_sweep_whose_remediations_the_broker_refused_says_deferred_and_exits_0(
        cli_env: None, engine: Engine, corrupted: dict[str, str], output: list[str],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    set_stage(engine, "100")
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:1/0")  # broker down: every send refused
    assert main(["sweep", *output]) == 0
    out = capsys.readouterr().out
    if output:
        report = json.loads(out)
        assert (report["errors"], report["enqueued"], report["deferred"]) == (0, 0, 3)
    else:
        assert "enqueued 0  deferred 3  errors 0" in out


def test_a_clean_sweep_exits_0_with_json(cli_env: None, engine: Engine, corrupted: dict[str, str],
                                         capsys: pytest.CaptureFixture[str]):
    assert main(["sweep", "--json"]) == 0  # stage off: drift recorded, nothing to enqueue
    assert json.loads(capsys.readouterr().out)["errors"] == 0


def test_ctrl_c_during_a_sweep_exits_130_and_is_no_error_for_the_rollout_gate(
        cli_env: None, engine: Engine, corrupted: dict[str, str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]):
    """An operator's Ctrl-C stops `dunning sweep` with 130 and no traceback. Before, the run was
    closed as a failed sweep with a sweep_error ('failed') row, which the rollout gate counts among
    its errors (each one not about an account counts): a few interrupted sweeps rolled the rollout
    back by themselves. The run is closed 'interrupted'; nothing counts against the stage."""
    import signal

    from app.domain.rollout import health_since, rollout_policy
    from app.policy_file import load_policy
    from app.rollout.gate import measure
    from app.rollout.store import read_state
    from app.sweep import sweep as sweep_module

    set_stage(engine, "100")
    real_compute = sweep_module.compute
    calls: list[str] = []

    def interrupted_on_the_second_page(snapshot, policy, now):
        calls.append(snapshot.account_id)
        if len(calls) == 3:  # the first account of the second page (pages of 2)
            signal.raise_signal(signal.SIGINT)  # Ctrl-C: Python raises KeyboardInterrupt here
        return real_compute(snapshot, policy, now)

    monkeypatch.setattr(sweep_module, "compute", interrupted_on_the_second_page)
    assert main(["sweep", "--batch-size", "2"]) == 130
    assert len(calls) == 3
    assert "Traceback" not in capsys.readouterr().err
    with engine.connect() as conn:
        [(state, errors)] = conn.exec_driver_sql("SELECT state, errors FROM sweep_run").all()
        kinds = [r[0] for r in conn.exec_driver_sql("SELECT kind FROM sweep_error")]
        rollout = read_state(conn)
        policy = load_policy()
        health = measure(conn, health_since(rollout.status, rollout_policy(policy.extra), datetime.now(UTC)),
                         rollout.stage)
    assert (state, errors, kinds) == ("interrupted", 0, [])
    assert health.errors == 0


def test_a_terminated_sweep_closes_its_run_and_the_next_sweep_starts(
        cli_env: None, engine: Engine, corrupted: dict[str, str], capsys: pytest.CaptureFixture[str]):
    """SIGTERM (`timeout`, a CronJob past its deadline, a container stopped) killed `dunning sweep`
    outright: its run stayed 'running' with a fresh heartbeat, and every sweep for the next 15
    minutes was refused as 'still running' (status 1) though nothing ran. It is closed as Ctrl-C
    closes it ('interrupted'), with the shell's status for SIGTERM (143), and the next one runs."""
    import os
    import subprocess
    import sys

    from tests.integration.test_cli_recompute import ROOT

    script = ("import signal, sys\n"
              "from app.cli import main\n"
              "from app.sweep import sweep\n"
              "real, calls = sweep.compute, []\n"
              "def terminated_on_the_second_page(snapshot, policy, now):\n"
              "    calls.append(1)\n"
              "    if len(calls) == 3:\n"
              "        signal.raise_signal(signal.SIGTERM)\n"
              "    return real(snapshot, policy, now)\n"
              "sweep.compute = terminated_on_the_second_page\n"
              "sys.exit(main(['sweep', '--batch-size', '2']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=dict(os.environ))
    assert done.returncode == 143, done.stderr[-400:]
    assert "Traceback" not in done.stderr
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT state FROM sweep_run").scalar_one() == "interrupted"
    assert main(["sweep"]) == 0, capsys.readouterr().err
