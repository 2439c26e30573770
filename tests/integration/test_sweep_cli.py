# ruff: noqa: F811
"""`dunning sweep`: the exit status says whether the sweep had errors, whatever the output format.

Rule: a sweep with errors (compute failures, remediations the broker refused) exits 1, with
``--json`` as without it (before, ``--json`` exited 0: a script reading JSON took a failed sweep
for a clean one).
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
    set_stage(engine, "100")
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:1/0")  # broker down: every enqueue fails
    assert main(["sweep", *output]) == 1
    out = capsys.readouterr().out
    if output:
        report = json.loads(out)
        assert (report["errors"], report["enqueued"]) == (3, 0)
    else:
        assert "enqueued 0  errors 3" in out


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

    def interrupted_on_the_second_page(snapshot, policy, now):  # type: ignore[no-untyped-def]
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
