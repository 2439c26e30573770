# ruff: noqa: F811
"""A drift remediation that runs after the rollout narrowed past its account is withdrawn.

The sweep requests each remediation (trigger DRIFT_DETECTED, cause drift_sweep:<run>) and sends it;
it may run much later: queued behind a backlog, or deferred by a broker that refused the send until
beat's stale-request re-drive sends it. Before, it ran whatever the rollout had become meanwhile: an
operator's rollback to off (or the gate's step back) left every remediation already requested
running, the very remediations the rollback was to stop. The run now looks at the stage again when
the request it takes is the sweep's and no one asked for the account since: outside the stage,
nothing is computed or applied, and the drift_record is no longer a remediation. A request someone
else asked for too (a webhook) is a recompute like any other, and runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine

from app.db import unit_of_work
from app.recompute.service import run_recompute
from app.redrive import redrive
from app.rollout.store import change
from app.sweep.remediate import celery_enqueuer
from app.sweep.sweep import Sweeper
from tests.conftest import wait_for
from tests.integration.test_sweep import Recorder, corrupted, dunning, rollout_off, set_stage, sql  # noqa: F401
from webhooks.store import request_recompute

DRIFTED = ("paid", "unpaid", "flagged")


def _rollback(engine: Engine) -> None:
    with unit_of_work(engine) as conn:
        change(conn, "rollback", "dana", "remediations look wrong", datetime.now(UTC))
    assert sql(engine, "SELECT stage FROM rollout_state")[0][0] == "off"


def test_a_deferred_remediation_sent_after_a_rollback_is_withdrawn(
        settings, runtime, celery_app, worker: Any, engine: Engine, corrupted: dict[str, str]):
    from tasks.factory import make_celery

    drifted = sorted(corrupted[n] for n in DRIFTED)
    set_stage(engine, "named", named=drifted, entered=datetime.now(UTC) - timedelta(hours=2))
    dead_broker = make_celery(settings.with_overrides(broker_url="redis://127.0.0.1:1/0"))
    report = Sweeper(engine, runtime.policy, celery_enqueuer(dead_broker)).start()
    assert report.deferred == 3, report.to_json()

    _rollback(engine)  # named -> off while the broker was away
    # The broker is back: the re-drive sends the stored requests and the worker runs them.
    assert redrive(engine, celery_app, stale_after_seconds=0)["sent"] == 3
    wait_for(lambda: sql(engine, "SELECT count(*) FROM recompute_request")[0][0] == 0, timeout=30,
             message="the re-driven remediations to run")

    # Nothing remediated: the stored states are as the sweep found them.
    assert dunning(engine, corrupted["paid"]).status == "bad_debt"
    assert dunning(engine, corrupted["unpaid"]).level == "suspended"
    assert sql(engine, "SELECT bad_debt FROM subs_account WHERE account_id = %(a)s", a=corrupted["flagged"])[0][0]
    assert sql(engine, "SELECT count(*) FROM subs_dunning WHERE last_trigger = 'DRIFT_DETECTED' "
                       "AND account_id = ANY(%(a)s)", a=drifted)[0][0] == 0
    assert sorted(tuple(r) for r in sql(engine, "SELECT account_id, remediated, skipped FROM drift_record")) == \
        [(a, False, "out_of_stage") for a in drifted]


def test_a_remediation_still_inside_the_stage_runs(runtime, engine: Engine, corrupted: dict[str, str]):
    account = corrupted["paid"]
    set_stage(engine, "named", named=[account])
    Sweeper(engine, runtime.policy, Recorder()).start()
    set_stage(engine, "5", named=[account])  # widened meanwhile: still inside
    result = run_recompute(engine, runtime.policy, account, "DRIFT_DETECTED", datetime.now(UTC), coalesced=True)
    assert result.outcome == "changed"
    assert dunning(engine, account).status == "current"
    assert tuple(sql(engine, "SELECT remediated, skipped FROM drift_record")[0]) == (True, None)


def test_a_remediation_a_webhook_asked_for_too_runs_after_a_rollback(runtime, engine: Engine,
                                                                     corrupted: dict[str, str]):
    account = corrupted["paid"]
    set_stage(engine, "named", named=[account])
    Sweeper(engine, runtime.policy, Recorder()).start()
    with unit_of_work(engine) as conn:  # a webhook for the account, coalesced into the sweep's request
        assert request_recompute(conn, account, "PAYMENT_FAILED", "evt_1") is False
    _rollback(engine)
    result = run_recompute(engine, runtime.policy, account, "DRIFT_DETECTED", datetime.now(UTC), coalesced=True)
    assert result.outcome == "changed"
    assert dunning(engine, account).status == "current"
