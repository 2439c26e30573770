# ruff: noqa: F811
"""A chained sweep segment that meets the sweep lock.

Rule: a segment of a sweep that is still running, finding the lock taken (an operator's `dunning
sweep --dry-run` walking every account, beat's drift_sweep looking in), sends itself again
BUSY_COUNTDOWN seconds later (within the visibility timeout's countdown budget), at most BUSY_RETRIES
times in a row. Before, it was dropped: nothing carried the sweep on, which sat 'running' until beat
abandoned it and started over from the first account. A segment of a sweep no longer running is
dropped.
"""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from typing import Any

import redis
from sqlalchemy import Engine

from app.config import MAX_TASK_COUNTDOWN
from app.sweep.lock import sweep_lock
from app.sweep.sweep import Sweeper
from tasks.sweeps import BUSY_COUNTDOWN, BUSY_RETRIES
from tests.integration.test_sweep import Recorder, corrupted, rollout_off, set_stage, sql  # noqa: F401


def _sweeps_queue(settings) -> list[dict[str, Any]]:
    """The messages on the sweeps queue: {task, eta, args, kwargs}."""
    queue = redis.Redis.from_url(settings.broker_url)
    try:
        raw = [json.loads(m) for m in queue.lrange(f"{settings.broker_key_prefix}sweeps", 0, -1)]
    finally:
        queue.close()
    out = []
    for m in raw:
        args, kwargs, _embed = json.loads(base64.b64decode(m["body"]))
        out.append({"task": m["headers"]["task"], "eta": m["headers"].get("eta"), "args": args, "kwargs": kwargs})
    return out


def _segment(celery_app, run_id: int, waited: int = 0) -> dict[str, Any]:
    celery_app.loader.import_default_modules()
    result: dict[str, Any] = celery_app.tasks["tasks.sweep_batch"].apply(args=[run_id],
                                                                         kwargs={"waited": waited}).get()
    return result


def _first_segment(engine: Engine, runtime) -> int:
    set_stage(engine, "100")
    first = Sweeper(engine, runtime.policy, Recorder(), batch_size=2).start(max_seconds=0)
    assert not first.finished and first.run_id is not None
    return first.run_id


def test_a_segment_that_meets_the_lock_is_sent_again_and_carries_the_sweep_on(
        runtime, engine: Engine, corrupted: dict[str, str], celery_app, settings):
    run_id = _first_segment(engine, runtime)
    with sweep_lock(engine):  # `dunning sweep --dry-run` holds it for its whole walk
        result = _segment(celery_app, run_id)
    assert result["again_in"] == BUSY_COUNTDOWN and "another drift sweep" in result["skipped"]
    [again] = _sweeps_queue(settings)
    assert (again["task"], again["args"], again["kwargs"]) == ("tasks.sweep_batch", [run_id], {"waited": 1})
    assert again["eta"] is not None  # a countdown, not at once
    assert sql(engine, "SELECT state FROM sweep_run WHERE id = %(i)s", i=run_id)[0][0] == "running"

    # Once the lock is free, the segment sent again walks on from the cursor.
    done = _segment(celery_app, run_id, waited=1)
    assert done["finished"] and done["scanned"] == 6
    assert sql(engine, "SELECT state, scanned FROM sweep_run WHERE id = %(i)s", i=run_id)[0] == ("finished", 6)


def test_the_countdown_fits_the_visibility_timeout_budget():
    assert 0 < BUSY_COUNTDOWN <= MAX_TASK_COUNTDOWN


def test_a_segment_that_waited_its_turns_or_whose_sweep_ended_is_dropped(
        runtime, engine: Engine, corrupted: dict[str, str], celery_app, settings):
    run_id = _first_segment(engine, runtime)
    with sweep_lock(engine):
        gave_up = _segment(celery_app, run_id, waited=BUSY_RETRIES)
    assert "again_in" not in gave_up and "skipped" in gave_up
    sql(engine, "UPDATE sweep_run SET state = 'abandoned' WHERE id = %(i)s", i=run_id)
    with sweep_lock(engine):
        ended = _segment(celery_app, run_id)
    assert "again_in" not in ended
    assert _sweeps_queue(settings) == []


def test_a_first_segment_whose_worker_was_lost_is_resumed_by_its_retry(
        runtime, engine: Engine, corrupted: dict[str, str], celery_app, settings):
    """The worker running tasks.drift_sweep's first segment is lost (out of memory, killed): its
    sweep_run is 'running', heartbeat fresh, cursor where the last page was recorded, and no segment
    was chained. Celery sends the task again as a retry (task_retry_on_worker_lost). Before, the
    retry found that sweep 'still running' and skipped: nothing carried it on, it sat until beat
    abandoned it (15 minutes without a heartbeat) and a later beat started over from the first
    account. Now the retry chains the sweep's next segment, which resumes from the cursor."""
    run_id = _first_segment(engine, runtime)  # the killed segment's work, recorded up to its cursor
    celery_app.loader.import_default_modules()
    result = celery_app.tasks["tasks.drift_sweep"].apply(retries=1).get()
    assert result.get("resumed") == run_id, result
    [again] = _sweeps_queue(settings)
    assert (again["task"], again["args"]) == ("tasks.sweep_batch", [run_id])
    done = _segment(celery_app, run_id)
    assert done["finished"] and done["scanned"] == 6
    assert sql(engine, "SELECT count(*) FROM sweep_run")[0][0] == 1


def test_beats_drift_sweep_leaves_a_sweep_between_its_segments_alone(
        runtime, engine: Engine, corrupted: dict[str, str], celery_app, settings):
    """Not a retry: a sweep 'running' between two segments has its next segment on the queue."""
    _first_segment(engine, runtime)
    celery_app.loader.import_default_modules()
    result = celery_app.tasks["tasks.drift_sweep"].apply().get()
    assert "still running" in result["skipped"] and "resumed" not in result
    assert _sweeps_queue(settings) == []


def test_a_drift_sweep_delivered_again_after_its_worker_was_killed_counts_as_lost():
    """The whole worker killed: Redis restores its unacknowledged message (redelivered, no retry)."""
    from types import SimpleNamespace

    from tasks.sweeps import run_was_lost

    assert run_was_lost(SimpleNamespace(retries=1, delivery_info={}))
    assert run_was_lost(SimpleNamespace(retries=0, delivery_info={"redelivered": True}))
    assert not run_was_lost(SimpleNamespace(retries=0, delivery_info={"redelivered": False}))
    assert not run_was_lost(SimpleNamespace(retries=0, delivery_info=None))


def test_a_segment_whose_next_segment_the_broker_refused_leaves_the_sweep_to_beats_next_drift_sweep(
        runtime, engine: Engine, corrupted: dict[str, str], celery_app, settings, monkeypatch):
    """A segment recorded its pages, then the broker refused the next segment's send. Before, the
    BrokerUnavailable escaped the task: the sweep sat 'running' with nothing to carry it on, beat's
    drift_sweep found it 'still running' until its heartbeat was 15 minutes stale, abandoned it and
    started over from the first account. Now the segment returns, the sweep is left for beat's next
    drift_sweep, which chains the next segment (within UNCHAINED_WAITS, an hour, of its last page):
    the sweep walks on from its cursor, one sweep, no account walked twice."""
    from tasks import sweeps
    from tasks.factory import make_celery

    run_id = _first_segment(engine, runtime)
    chain = sweeps._sweeper

    def one_page_at_a_time(task: Any, failures: int = 0) -> tuple[Sweeper, float]:
        sweeper, _segment_seconds = chain(task, failures)
        sweeper.batch_size = 2
        return sweeper, 0.0  # a segment of one page: accounts remain after it

    monkeypatch.setattr(sweeps, "_sweeper", one_page_at_a_time)
    dead_broker = make_celery(settings.with_overrides(broker_url="redis://127.0.0.1:1/0"))
    dead_broker.loader.import_default_modules()
    segment = dead_broker.tasks["tasks.sweep_batch"].apply(args=[run_id])
    assert segment.successful(), segment.traceback
    result = segment.get()
    assert (result["finished"], result["scanned"], result["next_segment"]) == \
        (False, 4, "left for beat's drift_sweep"), result
    assert _sweeps_queue(settings) == []
    assert sql(engine, "SELECT state, scanned FROM sweep_run WHERE id = %(i)s", i=run_id)[0] == ("running", 4)

    # The broker back, beat's next drift_sweep (not a retry; the heartbeat stale by now) chains it.
    sql(engine, "UPDATE sweep_run SET updated_at = now() - interval '20 minutes' WHERE id = %(i)s", i=run_id)
    celery_app.loader.import_default_modules()
    resumed = celery_app.tasks["tasks.drift_sweep"].apply().get()
    assert resumed.get("resumed") == run_id, resumed
    [again] = _sweeps_queue(settings)
    assert (again["task"], again["args"]) == ("tasks.sweep_batch", [run_id])
    monkeypatch.setattr(sweeps, "_sweeper", chain)
    done = _segment(celery_app, run_id)
    assert done["finished"] and done["scanned"] == 6
    assert [tuple(r) for r in sql(engine, "SELECT state, scanned, note FROM sweep_run")] == [("finished", 6, None)]


def test_a_sweep_left_for_beat_longer_than_it_waits_is_abandoned_and_the_next_starts_over(
        runtime, engine: Engine, corrupted: dict[str, str]):
    """After an outage longer than UNCHAINED_WAITS the sweep is stale as any other: abandoned, and a
    sweep (beat's, or `dunning sweep` run by hand) starts over from the first account."""
    from app.sweep.sweep import UNCHAINED_WAITS, leave_for_beat

    run_id = _first_segment(engine, runtime)
    assert leave_for_beat(engine, run_id)
    sql(engine, "UPDATE sweep_run SET updated_at = now() - %(age)s WHERE id = %(i)s",
        age=UNCHAINED_WAITS + timedelta(minutes=1), i=run_id)
    again = Sweeper(engine, runtime.policy, Recorder()).start()
    assert again.run_id != run_id and again.finished and again.scanned == 6
    assert sql(engine, "SELECT state FROM sweep_run WHERE id = %(i)s", i=run_id)[0][0] == "abandoned"


def test_a_segment_that_met_the_lock_and_could_not_be_sent_again_leaves_the_sweep_to_beat(
        runtime, engine: Engine, corrupted: dict[str, str], celery_app, settings):
    """Every link of the chain: the segment sent again after meeting the lock, refused by the broker."""
    from tasks.factory import make_celery

    run_id = _first_segment(engine, runtime)
    # Redis down: the broker refuses, and the result backend (the same Redis) is never asked
    # (test_sends_leave_result_backend_alone.py).
    dead_broker = make_celery(settings.with_overrides(broker_url="redis://127.0.0.1:1/0"))
    dead_broker.loader.import_default_modules()
    with sweep_lock(engine):
        segment = dead_broker.tasks["tasks.sweep_batch"].apply(args=[run_id])
    assert segment.successful(), segment.traceback
    assert segment.get()["next_segment"] == "left for beat's drift_sweep", segment.get()
    celery_app.loader.import_default_modules()
    assert celery_app.tasks["tasks.drift_sweep"].apply().get().get("resumed") == run_id
    [again] = _sweeps_queue(settings)
    assert (again["task"], again["args"]) == ("tasks.sweep_batch", [run_id])
