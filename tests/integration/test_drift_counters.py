# ruff: noqa: F811
"""What the drift counters count (DESIGN 9: drift found/remediated by the fleet's sweeps).

dunning_drift_remediated_total counts every remediation the sweep requested: sent, or deferred (the
broker refused the send; beat's re-drive sends the request later). Its help text said "recomputes
enqueued", which a deferred one is not (yet).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from app import metrics
from app.sweep.remediate import celery_enqueuer
from app.sweep.sweep import Sweeper
from tests.integration.test_sweep import corrupted, rollout_off, set_stage, sql  # noqa: F401


def counted() -> tuple[float, float, float, float]:
    return (metrics.DRIFT_FOUND.labels("true")._value.get(), metrics.DRIFT_FOUND.labels("false")._value.get(),
            metrics.DRIFT_REMEDIATED._value.get(), metrics.SWEEP_ERRORS.labels("unreadable")._value.get())


def help_text(client: Any, name: str) -> str:
    page = client.get("/metrics").get_data(as_text=True)
    return next(line for line in page.splitlines() if line.startswith(f"# HELP {name} "))


def test_the_remediated_counter_says_it_counts_deferred_remediations_and_does(
        settings, runtime, client, engine: Engine, corrupted: dict[str, str]):
    from tasks.factory import make_celery

    assert help_text(client, "dunning_drift_remediated_total") == (
        "# HELP dunning_drift_remediated_total Drift remediations the sweep requested: recomputes sent, or "
        "deferred (the broker refused the send; beat's re-drive sends the request later)")
    drifted = sorted(corrupted[n] for n in ("paid", "unpaid", "flagged"))
    set_stage(engine, "named", named=drifted)
    before = counted()
    dead_broker = make_celery(settings.with_overrides(broker_url="redis://127.0.0.1:1/0"))
    report = Sweeper(engine, runtime.policy, celery_enqueuer(dead_broker)).start()
    assert (report.enqueued, report.deferred) == (0, 3), report.to_json()
    assert counted()[2] - before[2] == 3
