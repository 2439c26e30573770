"""Fleet gauges under multiprocess metrics: the value /metrics shows is the latest one written.

The gauges read from the database (the rollout stage, the outbox backlog, stuck work, accounts stuck
in lifting, the bad-debt counts) describe the fleet, not a process: whichever process refreshes them
writes the truth of that moment, so the newest write wins (multiprocess_mode="mostrecent"). Under
"max" any process's older, higher value won, a dead process's included (its file stays): after a
step back /metrics kept showing the stage stepped back from, and a drained backlog never drained.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import Gauge

from app import metrics, metrics_db
from app.api import metrics as metrics_api

ROOT = Path(__file__).resolve().parents[2]

# (module, attribute, labels): every gauge metrics_db.refresh and its peers set from the database.
FLEET_GAUGES = [
    ("app.metrics", "ROLLOUT_STAGE", {}),
    ("app.metrics", "OUTBOX_BACKLOG", {}),
    ("app.metrics", "OUTBOX_BLOCKED", {}),
    ("app.metrics", "STUCK_IN_LIFTING", {}),
    ("app.metrics", "STUCK_EVENTS", {"state": "retrying"}),
    ("app.metrics_db", "BAD_DEBT_OPEN", {}),
    ("app.metrics_db", "BAD_DEBT_PAYMENTS_PENDING", {}),
    ("app.api.metrics", "REFRESH_OK", {}),  # whether the last scrape could read them
]
# Per-process on purpose (none now): a gauge named here keeps its own multiprocess mode.
PER_PROCESS_GAUGES: set[str] = set()

SET = """
import importlib, json, os, sys
for module, attribute, labels in json.loads(sys.argv[1]):
    gauge = getattr(importlib.import_module(module), attribute)
    (gauge.labels(**labels) if labels else gauge).set(float(sys.argv[2]))
print(os.getpid())
"""

READ = """
import json, sys
from prometheus_client import multiprocess
from app import metrics
for pid in sys.argv[1:]:  # as tasks/metrics.py does for a prefork child that exits
    multiprocess.mark_process_dead(int(pid))
shown = [[s.name, {k: v for k, v in s.labels.items() if k != "pid"}, s.value]
         for family in metrics.registry().collect() for s in family.samples]
print(json.dumps(shown))
"""


def run(code: str, *args: str, directory: Path) -> str:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True,
                         cwd=ROOT, timeout=60)
    return out.stdout.strip()


def _gauge(module: str, attribute: str) -> Gauge:
    gauge = getattr(importlib.import_module(module), attribute)
    assert isinstance(gauge, Gauge)
    return gauge


def _gauges() -> list[Gauge]:
    modules = (metrics, metrics_db, metrics_api)
    return [v for m in modules for v in vars(m).values() if isinstance(v, Gauge)]


def test_every_fleet_gauge_shows_its_latest_value():
    """A gauge added later must decide: the fleet's latest value, or named here as per-process."""
    modes = {g._name: g._multiprocess_mode for g in _gauges()}
    assert set(modes) >= PER_PROCESS_GAUGES
    fleet = {name: mode for name, mode in modes.items() if name not in PER_PROCESS_GAUGES}
    assert fleet == dict.fromkeys(fleet, "mostrecent")
    assert {_gauge(m, a)._name for m, a, _ in FLEET_GAUGES} == set(fleet)  # each one run below


@pytest.mark.parametrize("first_marked_dead", [True, False], ids=["first-process-gone", "first-process-alive"])
def test_fleet_gauges_show_the_latest_write_not_an_older_higher_one(tmp_path: Path, first_marked_dead: bool):
    """Worker A refreshed while the stage was 50% (index 5) and the backlog high, then worker B
    refreshed after the step back and the drain: /metrics shows B's values, whether A has exited
    since (its file stays) or is still alive."""
    every = json.dumps(FLEET_GAUGES)
    first = run(SET, every, "5", directory=tmp_path)
    run(SET, every, "4", directory=tmp_path)
    shown = json.loads(run(READ, *([first] if first_marked_dead else []), directory=tmp_path))
    for module, attribute, labels in FLEET_GAUGES:
        name = _gauge(module, attribute)._name
        values = [v for n, sample_labels, v in shown if n == name and sample_labels == labels]
        assert values == [4.0], f"{name}{labels} shows {values} after the latest write of 4"
