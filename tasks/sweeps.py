"""Beat work of DESIGN section 6: tasks.drift_sweep, tasks.sweep_batch, tasks.check_rollout_gate, and
tasks.refile_mirror, which keeps the Stripe mirror filed by account for the sweep's range reads.

A sweep runs in segments of at most half the tasks' soft time limit; when accounts remain, the
segment chains tasks.sweep_batch with the sweep id (the cursor is in sweep_run), so no single task
comes near the timeout that would make Redis deliver it twice. A segment that finds the sweep lock
taken sends itself again a little later: the chain is the only thing that carries a sweep on. A
drift_sweep sent again after its worker was lost chains the next segment of the sweep its lost run
began (run_was_lost), rather than skipping it as 'still running'. A link of the chain the broker
refuses (the next segment, a segment sent again) leaves the sweep for beat's next drift_sweep
(app.sweep.sweep.leave_for_beat), which chains it the same way; the segment returns as it would
have. Raised, the task failed and the sweep sat 'running' until beat abandoned it (15 minutes
without a heartbeat, up to 30 in all) and started over from the first account.

A segment that fails on a failure that passes (the database or broker connection, lock contention:
app.sweep.sweep.RETRIED) is sent again with its class's backoff and jitter (tasks/failures.py
POLICIES), as tasks.sweep_batch with ``failures`` counting its failures in a row (a segment that
recorded a page starts them over), and resumes from the cursor of the last page recorded; its run
stays 'running' and nothing counts against the rollout stage. Once that class's retries are over,
the segment runs without retrying and a failure fails the sweep: 'failed', one sweep_error naming
its class, counted by the gate as before.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from celery import Task, shared_task

from app.config import task_time_limits
from app.db import unit_of_work
from app.dispatch import BrokerUnavailable, recompute_call, send, send_many
from app.rollout.gate import check_gate
from app.sweep.lifting import count_stuck_in_lifting
from app.sweep.refile import RECOMPUTE_TRIGGER, refile_customers
from app.sweep.remediate import celery_enqueuer
from app.sweep.sweep import RETRIED, SweepBusy, Sweeper, SweepReport, SweepRetry, leave_for_beat, retry_within
from tasks.failures import POLICIES, FailureKind, classify, count_failure
from tasks.recompute import handle_failure
from tasks.runtime import runtime_for

log = logging.getLogger(__name__)

# A segment that meets the sweep lock (an operator's `dunning sweep --dry-run` walking every account,
# beat's drift_sweep looking in for a moment) is sent again this many seconds later (a countdown
# within the visibility timeout's budget, app/config.py MAX_TASK_COUNTDOWN)...
BUSY_COUNTDOWN = 30
# ... at most this many times in a row: 10 minutes, within the 15 after which beat's drift_sweep
# abandons a sweep whose heartbeat stopped and starts a new one from the first account anyway.
BUSY_RETRIES = 20


SWEEP_BATCH = "tasks.sweep_batch"
# A segment sent again (apply_async, for its countdown) is sent with ignore_result, as app/dispatch.py
# sends every segment: nobody reads one, and Celery's Redis result backend, told to keep a result,
# subscribes to its channel before the broker is tried: with Redis down, the send sat in the
# backend's reconnection (about 20 s) before the broker's refusal came. Flower shows the segment's
# states and return value all the same (they come from the task events).


def _sweeper(task: Task, failures: int = 0) -> tuple[Sweeper, float]:
    rt = runtime_for(task.app)
    segment = max(10.0, task_time_limits(rt.settings.visibility_timeout)[1] / 2)  # half the soft limit
    return Sweeper(rt.engine, rt.policy, celery_enqueuer(task.app), retry=retry_within(failures)), segment


def _retry_later(task: Task, run_id: int, kind: FailureKind, failures: int, progressed: bool) -> dict[str, Any]:
    """The segment of sweep ``run_id`` that failed on ``kind`` (a failure that passes), sent again
    with that class's backoff and jitter; it resumes from the cursor. Not sent (the broker refuses
    it), nothing carries the sweep on: beat's drift_sweep abandons it once its heartbeat is stale and
    starts over, as for a segment lost any other way."""
    in_a_row = 0 if progressed else failures
    countdown = POLICIES[kind].countdown(in_a_row)
    count_failure(task.name, kind, "retry")
    try:
        task.app.tasks[SWEEP_BATCH].apply_async([run_id], {"failures": in_a_row + 1}, countdown=countdown,
                                                ignore_result=True)
    except Exception as exc:  # kombu's connection errors
        log.warning("drift sweep %s: failed segment (%s) not sent again: %s", run_id, kind.value, exc)
        return {"failed": kind.value, "run_id": run_id, "next_segment": _unchained(task, run_id, exc)}
    log.warning("drift sweep %s: segment failed (%s), sent again in %.1f s (failure %d in a row)", run_id,
                kind.value, countdown, in_a_row + 1)
    return {"failed": kind.value, "run_id": run_id, "again_in": round(countdown, 3), "failures": in_a_row + 1}


def _after(task: Task, report: SweepReport) -> dict[str, Any]:
    out = report.to_json()
    out.pop("drifted_accounts")
    if not report.finished and report.run_id is not None:
        try:
            send(task.app, SWEEP_BATCH, [report.run_id])
        except BrokerUnavailable as exc:  # the segment's pages are recorded; only the chain broke
            out["next_segment"] = _unchained(task, report.run_id, exc)
    log.info("drift sweep %s: %s", report.run_id, out)
    return out


def _unchained(task: Task, run_id: int, exc: Exception) -> str:
    """Sweep ``run_id``'s next segment could not be sent (the broker refused it): left for beat's next
    drift_sweep, which sends it (leave_for_beat); the broker's class counted as given up to beat."""
    count_failure(task.name, FailureKind.BROKER_UNAVAILABLE, "retrying")
    if leave_for_beat(runtime_for(task.app).engine, run_id):
        log.warning("drift sweep %s: next segment not sent (%s); beat's drift_sweep resumes it", run_id, exc)
        return "left for beat's drift_sweep"
    log.warning("drift sweep %s: next segment not sent (%s), nor the sweep left for beat: abandoned once its "
                "heartbeat is stale", run_id, exc)
    return "not sent"


@shared_task(name="tasks.drift_sweep", bind=True)
def drift_sweep(self: Task) -> dict[str, Any]:
    sweeper, segment = _sweeper(self)
    try:
        report = sweeper.start(max_seconds=segment)
    except SweepBusy as exc:
        if exc.run_id is not None and (exc.unchained or run_was_lost(self.request)):
            return _resume(self, exc.run_id, exc)
        log.info("drift sweep not started: %s", exc)
        return {"skipped": str(exc)}
    except SweepRetry as exc:
        return _retry_later(self, exc.run_id, exc.kind, 0, exc.progressed)
    except Exception as exc:
        # The walk sends itself again on a failure that passes (SweepRetry above) and fails the sweep
        # on anything else (a sweep_error the gate counts: raised as before, the next tick starts
        # over). One that passes met here came before the walk (the database down as the sweep lock
        # or the run's row is taken) or after its last page (the run's record, the lock's release): by
        # failure class, as every beat tick (its retry resumes a run left running: run_was_lost).
        # Raised, the tick was acknowledged with no retry, counted nowhere, and no sweep ran until
        # the next one, 15 minutes on.
        if classify(exc) in RETRIED:
            handle_failure(self, exc, None, {})
        raise
    return _after(self, report)


def run_was_lost(request: Any) -> bool:
    """Whether this drift_sweep is one sent again after the run before it was lost: a retry (the
    only one it makes: task_retry_on_worker_lost, a pool child lost) or a message the broker
    delivered again (the whole worker killed, its unacknowledged message restored)."""
    return bool(request.retries) or bool((request.delivery_info or {}).get("redelivered"))


def _resume(task: Task, run_id: int, busy: SweepBusy) -> dict[str, Any]:
    """drift_sweep finds a sweep 'running' with no segment chained and none holding the lock: its next
    segment not sent (the broker refused it: ``busy.unchained``), or this drift_sweep is the one sent
    again after its worker was lost (no segment chained: that comes after a segment returns). It
    chains the next segment, which resumes from the cursor. Skipped, nothing carried the sweep on
    until beat abandoned it and started over from the first account. Should the lost run have chained
    it after all, the two segments take turns on the lock and the cursor: no account is walked twice.
    Not sent either, the sweep is left for beat's next drift_sweep."""
    why = "its next segment was not sent" if busy.unchained else "its worker was lost"
    try:
        send(task.app, SWEEP_BATCH, [run_id])
    except BrokerUnavailable as exc:
        log.warning("drift sweep %s: not resumed (%s): %s", run_id, why, exc)
        return {"skipped": str(busy), "next_segment": _unchained(task, run_id, exc)}
    log.warning("drift sweep %s: resumed (%s)", run_id, why)
    return {"skipped": str(busy), "resumed": run_id}


@shared_task(name="tasks.sweep_batch", bind=True)
def sweep_batch(self: Task, run_id: int, waited: int = 0, failures: int = 0) -> dict[str, Any]:
    """``failures``: the segments of this sweep that failed in a row before this one, on a failure
    that passes (sent again by _retry_later)."""
    sweeper, segment = _sweeper(self, failures)
    try:
        report = sweeper.resume(run_id, max_seconds=segment)
    except SweepBusy as exc:
        if waited < BUSY_RETRIES and sweeper.is_running(run_id):
            return _again_later(self, run_id, waited, exc, failures)
        log.info("drift sweep segment not run: %s", exc)
        return {"skipped": str(exc)}
    except SweepRetry as exc:
        return _retry_later(self, run_id, exc.kind, failures, exc.progressed)
    except Exception as exc:
        # Before the walk (the sweep lock, the run's row): the database down as the segment starts.
        # Sent again as a failure mid-walk is; dropped, nothing would carry the sweep on.
        kind = classify(exc)
        if kind in RETRIED and failures < POLICIES[kind].max_retries:
            return _retry_later(self, run_id, kind, failures, False)
        raise
    return _after(self, report)


def _again_later(task: Task, run_id: int, waited: int, busy: SweepBusy, failures: int = 0) -> dict[str, Any]:
    """The segment of a running sweep that met the lock, sent again: dropped, nothing would carry the
    sweep on, and beat would start it over from the first account once its heartbeat went stale. A
    task of its own (as tasks.bad_debt's busy settlements), counting how often it waited."""
    try:
        kwargs = {"waited": waited + 1, **({"failures": failures} if failures else {})}
        task.apply_async([run_id], kwargs, countdown=BUSY_COUNTDOWN, ignore_result=True)
    except Exception as exc:  # kombu's connection errors: left for beat's drift_sweep
        log.warning("drift sweep %s: segment not sent again: %s", run_id, exc)
        return {"skipped": str(busy), "next_segment": _unchained(task, run_id, exc)}
    log.info("drift sweep %s: segment waits %d s for the sweep lock: %s", run_id, BUSY_COUNTDOWN, busy)
    return {"skipped": str(busy), "again_in": BUSY_COUNTDOWN}


@shared_task(name="tasks.check_rollout_gate", bind=True)
def check_rollout_gate(self: Task) -> dict[str, Any]:
    rt = runtime_for(self.app)
    now = datetime.now(UTC)
    try:
        decision, health, state = check_gate(rt.engine, rt.policy, now)
        with unit_of_work(rt.engine) as conn:
            stuck = count_stuck_in_lifting(conn, rt.policy.guard_window_minutes, now)
    except Exception as exc:  # by failure class, as every beat task (a tick given up: a row its next tick resolves)
        handle_failure(self, exc, None, {})
        raise
    return {"action": decision.action, "reason": decision.reason, "decided_at_revision": decision.revision,
            "stage": state.stage, "held": state.held, "revision": state.revision,
            "health": health.to_json(), "stuck_in_lifting": stuck}


@shared_task(name="tasks.refile_mirror", bind=True)
def refile_mirror(self: Task) -> dict[str, Any]:
    """File the customers subs_customer maps differently from their mirror rows (app/sweep/refile.py)."""
    try:
        done = refile_customers(runtime_for(self.app).engine)
    except Exception as exc:  # lock contention on mirror_customer under a webhook burst, say: retried by its class
        handle_failure(self, exc, None, {})
        raise
    if done.filed:
        log.info("filed the mirror rows of %d customers under their accounts", done.filed)
    sent = 0
    if done.requested:
        try:
            send_many(self.app, [recompute_call(account, RECOMPUTE_TRIGGER, cause)
                                 for account, cause in done.requested])
            sent = len(done.requested)
        except BrokerUnavailable as exc:  # the requests stay: beat's stale-request re-drive sends them
            log.warning("recomputes of accounts whose customers moved not queued: %s", exc)
    return {"filed": done.filed, "recomputes": sent}
