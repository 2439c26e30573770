# ruff: noqa: F811
"""`dunning sweep`: the exit status says whether the sweep had errors, whatever the output format.

Rule: a sweep with errors (compute failures, remediations the broker refused) exits 1, with
``--json`` as without it (before, ``--json`` exited 0: a script reading JSON took a failed sweep
for a clean one).
"""

from __future__ import annotations

import json

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
