# ruff: noqa: F811
"""A task sent for a result nobody reads never touches the result backend.

Rule: only a support-started recompute's result is read (GET /support/tasks/<id>); every other send
is made with ignore_result, so Celery's Redis result backend does not subscribe to the task's result
channel as it sends (backend.on_task_call). Before, the sweep's segment sent again (met the sweep
lock, or failed on a failure that passes), a busy bad-debt settlement sent for later and beat's
ticks of tasks.drift_sweep, tasks.refile_mirror and tasks.check_rollout_gate subscribed first: with
Redis (the broker and, by default, the result backend) down, each send sat in the backend's
reconnection, about 20 s, before the broker's refusal came; and beat, which never reads a result,
kept one subscription per tick it sent.

Each test sends through a Celery app whose broker and result backend are a port nobody listens on:
the send meets the broker's refusal, and the backend's result consumer subscribed to nothing and
opened no pub/sub connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from celery import Celery
from celery.beat import Scheduler, SchedulingError
from sqlalchemy import Engine

from app.dispatch import BrokerUnavailable, enqueue_recompute, send
from app.runtime import Runtime
from app.sweep.lock import sweep_lock
from app.sweep.sweep import Sweeper
from tasks import runtime as task_runtime
from tasks.factory import make_celery
from tests.integration.test_sweep import Recorder, corrupted, rollout_off, set_stage  # noqa: F401
from tests.integration.test_sweep_transient_failure import _reads_failing, connection_reset

DEAD = "redis://127.0.0.1:1/0"


@contextmanager
def _dead(settings, runtime: Runtime, broker_url: str = DEAD) -> Iterator[Celery]:
    app = make_celery(settings.with_overrides(broker_url=broker_url, result_backend=DEAD))
    app.loader.import_default_modules()
    task_runtime._RUNTIMES[id(app)] = runtime  # the session's database and fake Stripe
    try:
        yield app
    finally:
        task_runtime._RUNTIMES.pop(id(app), None)


@pytest.fixture
def dead(settings, runtime: Runtime) -> Iterator[Celery]:
    """Broker and result backend both down (Redis down: by default they are the same server)."""
    with _dead(settings, runtime) as app:
        yield app


def untouched(app: Celery) -> None:
    """The result backend (this thread's: the eager tasks ran here) watched no task's result."""
    consumer = app.backend.result_consumer
    assert consumer.subscribed_to == set()
    assert consumer._pubsub is None  # no pub/sub connection made


def _first_segment(engine: Engine, runtime: Runtime) -> int:
    set_stage(engine, "100")
    first = Sweeper(engine, runtime.policy, Recorder(), batch_size=2).start(max_seconds=0)
    assert not first.finished and first.run_id is not None
    return first.run_id


def test_a_segment_that_met_the_lock_is_sent_again_without_a_result(
        runtime, engine: Engine, corrupted: dict[str, str], dead: Celery):
    run_id = _first_segment(engine, runtime)
    with sweep_lock(engine):
        segment = dead.tasks["tasks.sweep_batch"].apply(args=[run_id])
    assert segment.successful(), segment.traceback
    assert segment.get()["next_segment"] == "left for beat's drift_sweep"  # the broker's refusal, caught
    untouched(dead)


def test_a_failed_segment_is_sent_again_without_a_result(
        runtime, engine: Engine, corrupted: dict[str, str], dead: Celery, monkeypatch: pytest.MonkeyPatch):
    run_id = _first_segment(engine, runtime)
    _reads_failing(monkeypatch, connection_reset, times=1)
    segment = dead.tasks["tasks.sweep_batch"].apply(args=[run_id])
    assert segment.successful(), segment.traceback
    result = segment.get()
    assert (result["failed"], result["next_segment"]) == ("database_unavailable", "left for beat's drift_sweep")
    untouched(dead)


def test_a_busy_settlement_is_sent_again_without_a_result(client, engine, debtor, stripe_fake, settings,
                                                          dead: Celery):
    from app.db import session_lock
    from tasks.bad_debt import SETTLE
    from tests.integration.bad_debt_setup import take_queued
    from tests.integration.test_pay_bad_debt import charged_payment

    payment_id = charged_payment(client, debtor)
    take_queued(settings, SETTLE)  # the webhook's, on the live broker
    with session_lock(engine, f"bad_debt_settle:{debtor.account}") as got:
        assert got
        settlement = dead.tasks[SETTLE].apply([payment_id])
    assert settlement.successful(), settlement.traceback
    assert settlement.get()["outcome"] == "busy"
    assert stripe_fake.invoice_payments() == []
    untouched(dead)


def test_every_beat_tick_is_sent_without_a_result(dead: Celery):
    """Beat sends each entry as Task.apply_async with the entry's options: refused by the broker at once."""
    beat = Scheduler(app=dead, lazy=True)
    beat.setup_schedule()
    ticks = [entry for name, entry in beat.schedule.items() if not name.startswith("celery.")]
    assert len(ticks) == len(dead.conf.beat_schedule)
    for entry in ticks:
        with pytest.raises(SchedulingError) as refused:
            beat.apply_async(entry, advance=False)
        assert "Connection refused" in str(refused.value), (entry.task, refused.value)  # the broker's
    untouched(dead)


@pytest.mark.parametrize("dead_broker", [DEAD, "redis+socket:///nonexistent/redis.sock"])
def test_a_dispatch_send_hears_the_refusal_without_a_result(settings, runtime: Runtime, dead_broker: str):
    """app/dispatch.py, on the Redis lane and on Celery's own path (a broker URL the lane does not
    serve): a send whose result nobody reads hears BrokerUnavailable, the backend left alone."""
    with _dead(settings, runtime, dead_broker) as app:
        with pytest.raises(BrokerUnavailable):
            send(app, "tasks.sweep_batch", [1])
        with pytest.raises(BrokerUnavailable):
            enqueue_recompute(app, "acct", "STATE_REFRESH")
        untouched(app)


def test_the_support_pages_recompute_hears_the_refusal_before_the_backend_watches(settings, runtime: Runtime):
    """Its result is kept (the support page polls it), yet on the Redis lane the backend watches for
    it only once the broker took the message: refused, the support page answers 503 at once."""
    with _dead(settings, runtime) as app:
        with pytest.raises(BrokerUnavailable):
            enqueue_recompute(app, "acct", "NINJAPANEL_BUTTON", keep_result=True)
        untouched(app)
