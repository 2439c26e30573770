# ruff: noqa: F811
"""A remediation the broker refused is deferred to the re-drive, not an error of the stage.

The sweep stores each remediation's recompute request (trigger DRIFT_DETECTED, cause
drift_sweep:<run>) before it sends the task. When the broker refuses the send, the request stays and
beat's stale-request re-drive sends it once the broker is back: the remediation is late, not lost,
and the broker's outage says nothing about whether remediating was right. It was a sweep_error per
account, which the rollout gate counts: one broker blip during a sweep with a few drifted accounts
stepped the rollout back (and held it) as if remediation were harmful. It is counted as a
remediation (its outcome, reverted or not, is the stage's evidence) and shown as deferred.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine

from app.redrive import redrive
from app.rollout.gate import check_gate
from app.sweep.remediate import celery_enqueuer
from app.sweep.sweep import Sweeper
from tests.conftest import wait_for
from tests.integration.test_sweep import Recorder, corrupted, rollout_off, set_stage, sql  # noqa: F401

DRIFTED = ("paid", "unpaid", "flagged")


def test_a_remediation_the_broker_refused_is_no_error_and_the_redrive_sends_it(
        settings, runtime, celery_app, worker: Any, engine: Engine, corrupted: dict[str, str]):
    from tasks.factory import make_celery

    now = datetime.now(UTC)
    drifted = sorted(corrupted[n] for n in DRIFTED)
    # max_errors 1: the three refused sends, were they errors, would step the rollout back
    policy = replace(runtime.policy, extra={**runtime.policy.extra, "rollout": {"max_errors": 1, "soak_hours": 1}})
    set_stage(engine, "named", named=drifted, entered=now - timedelta(hours=2))
    dead_broker = make_celery(settings.with_overrides(broker_url="redis://127.0.0.1:1/0"))

    report = Sweeper(engine, policy, celery_enqueuer(dead_broker)).start()
    assert (report.in_stage, report.enqueued, report.deferred, report.errors) == (3, 0, 3, 0), report.to_json()
    assert sql(engine, "SELECT count(*) FROM sweep_error")[0][0] == 0
    assert sorted(tuple(r) for r in sql(engine, "SELECT account_id, remediated, skipped FROM drift_record")) == \
        [(a, True, None) for a in drifted]
    requests = sql(engine, "SELECT account_id, trigger, cause FROM recompute_request ORDER BY account_id")
    assert [tuple(r) for r in requests] == [(a, "DRIFT_DETECTED", f"drift_sweep:{report.run_id}") for a in drifted]

    # The gate: three remediations requested, none reverted, no error; healthy past the soak.
    decision, health, state = check_gate(engine, policy, datetime.now(UTC))
    assert (health.remediations, health.reverted, health.errors) == (3, 0, 0), health
    assert decision.action == "advance" and (state.stage, state.held) == ("5", False), decision

    # The broker is back: the re-drive sends the stored requests, the worker remediates them.
    assert redrive(engine, celery_app, stale_after_seconds=0)["sent"] == 3
    wait_for(lambda: sql(engine, "SELECT count(*) FROM recompute_request")[0][0] == 0, timeout=30,
             message="the re-driven remediations to run")
    stored_fixed = sorted(corrupted[n] for n in ("paid", "unpaid"))  # (flagged's fix is subs_account's flag)
    triggers = sql(engine, "SELECT account_id, last_trigger FROM subs_dunning WHERE account_id = ANY(%(a)s) "
                           "ORDER BY account_id", a=stored_fixed)
    assert [tuple(r) for r in triggers] == [(a, "DRIFT_DETECTED") for a in stored_fixed]
    again = Sweeper(engine, policy, Recorder()).start()
    assert (again.drifted, again.pending, again.errors) == (0, 0, 0), again.to_json()


def test_an_enqueue_that_fails_otherwise_is_still_an_error(runtime, engine: Engine, corrupted: dict[str, str]):
    """Not the broker (a bug in what sends it): an error of the account, as before; its request stays."""
    set_stage(engine, "100")

    def broken(account_id: str, run_id: int | None) -> str:
        raise TypeError("Object of type Decimal is not JSON serializable")

    report = Sweeper(engine, runtime.policy, broken).start()
    assert (report.in_stage, report.enqueued, report.deferred, report.errors) == (3, 0, 0, 3), report.to_json()
    assert {tuple(r) for r in sql(engine, "SELECT kind, failure_class FROM sweep_error")} == {("enqueue", None)}
    assert {tuple(r) for r in sql(engine, "SELECT remediated, skipped FROM drift_record WHERE skipped IS DISTINCT "
                                          "FROM 'out_of_stage'")} == {(False, "error")}
    assert sql(engine, "SELECT count(*) FROM recompute_request")[0][0] == 3


def test_after_the_broker_refused_a_send_the_rest_of_the_page_is_deferred_without_trying(
        runtime, engine: Engine, corrupted: dict[str, str]):
    """A broker that does not answer (a host gone, a network partition) costs each send its connect
    timeouts (two attempts of 3 s): tried for every drifted account of a page, a page of a wide stage
    ran past the task's soft time limit, and the sweep failed, an error the gate counts. After one
    refusal the page's other remediations are deferred at once; the next page tries again."""
    from app.dispatch import BrokerUnavailable

    set_stage(engine, "100")
    tried: list[str] = []

    def unreachable(account_id: str, run_id: int | None) -> str:
        tried.append(account_id)
        raise BrokerUnavailable("broker did not accept tasks.recompute_account: TimeoutError")

    # pages of 3 accounts in id order: flagged, ok_current, ok_other | ok_unpaid, paid, unpaid
    report = Sweeper(engine, runtime.policy, unreachable, batch_size=3).start()
    assert (report.in_stage, report.enqueued, report.deferred, report.errors) == (3, 0, 3, 0), report.to_json()
    assert tried == [corrupted["flagged"], corrupted["paid"]]  # one try per page with drift
    assert sql(engine, "SELECT count(*) FROM drift_record WHERE remediated")[0][0] == 3
    assert sql(engine, "SELECT count(*) FROM recompute_request WHERE trigger = 'DRIFT_DETECTED'")[0][0] == 3
