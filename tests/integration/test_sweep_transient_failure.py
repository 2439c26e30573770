# ruff: noqa: F811
"""A drift sweep segment that fails on a failure that passes is retried from its cursor.

Rule (DESIGN section 8): database or broker connection errors and lock contention retry with their
own backoff and jitter. Before, a database blip mid-segment (a connection reset, a failover, a
lock_timeout) marked the sweep 'failed' with a sweep_error the rollout gate counts against the stage
(five in its window step the rollout back, though nothing was wrong with remediation), and the next
beat tick started over from the first account. Now the segment is sent again as tasks.sweep_batch
with its class's backoff (``failures`` counting them in a row) and reads on from the cursor of the
last page it recorded; the run stays 'running' and nothing counts. A sweep still failing once its
class's retries are over, or failing on anything else (a bug, bad data), fails as before: 'failed',
one sweep_error naming its failure class, counted by the gate.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg2
import pytest
from sqlalchemy import Engine

from app.sweep import batch_read
from tasks.failures import POLICIES, FailureKind
from tests.integration.test_rollout_errors_by_account import gate_at
from tests.integration.test_sweep import corrupted, rollout_off, sql  # noqa: F401
from tests.integration.test_sweep_chain import _first_segment, _sweeps_queue

DB_RETRIES = POLICIES[FailureKind.DATABASE_UNAVAILABLE].max_retries


def _segment(celery_app, run_id: int, failures: int = 0) -> dict[str, Any]:
    celery_app.loader.import_default_modules()
    result: dict[str, Any] = celery_app.tasks["tasks.sweep_batch"].apply(
        args=[run_id], kwargs={"failures": failures} if failures else {}).get()
    return result


def _reads_failing(monkeypatch: pytest.MonkeyPatch, fail: Any, times: int | None) -> list[str]:
    """The page reader's range reads raise ``fail()`` the first ``times`` times (None: always); -> the
    cursor each read started after."""
    real = batch_read.read_range
    reads: list[str] = []

    def read_range(conn, after, upto):
        reads.append(after)
        if times is None or len(reads) <= times:
            raise fail()
        return real(conn, after, upto)

    monkeypatch.setattr(batch_read, "read_range", read_range)
    return reads


def connection_reset() -> psycopg2.OperationalError:
    return psycopg2.OperationalError("server closed the connection unexpectedly")


def _health_errors(engine: Engine, runtime) -> int:
    _decision, health, _state = gate_at(engine, runtime.policy, datetime.now(UTC))
    return int(health.errors)


def test_a_database_blip_mid_sweep_is_retried_from_the_cursor_and_counts_nothing(
        runtime, engine: Engine, corrupted: dict[str, str], celery_app, settings,
        monkeypatch: pytest.MonkeyPatch):
    run_id = _first_segment(engine, runtime)  # one page of 2 accounts recorded; cursor after them
    [(cursor, scanned)] = sql(engine, "SELECT cursor, scanned FROM sweep_run WHERE id = %(i)s", i=run_id)
    assert (scanned, bool(cursor)) == (2, True)
    reads = _reads_failing(monkeypatch, connection_reset, times=1)

    result = _segment(celery_app, run_id)
    assert (result["failed"], result["failures"]) == ("database_unavailable", 1), result
    assert sql(engine, "SELECT state, scanned, errors, cursor FROM sweep_run WHERE id = %(i)s", i=run_id) == \
        [("running", 2, 0, cursor)]
    assert sql(engine, "SELECT count(*) FROM sweep_error")[0][0] == 0
    [again] = _sweeps_queue(settings)
    assert (again["task"], again["args"], again["kwargs"]) == ("tasks.sweep_batch", [run_id], {"failures": 1})
    assert again["eta"] is not None  # the class's backoff, not at once

    done = _segment(celery_app, run_id, failures=1)
    assert done["finished"] and done["scanned"] == 6 and done["errors"] == 0, done
    assert reads[0] == reads[-1] == cursor  # read again from where it stopped, never from the first account
    assert sql(engine, "SELECT state, scanned, errors FROM sweep_run") == [("finished", 6, 0)]
    assert sql(engine, "SELECT count(*) FROM sweep_error")[0][0] == 0
    assert _health_errors(engine, runtime) == 0


def test_a_first_segment_that_meets_a_blip_chains_its_retry(
        runtime, engine: Engine, corrupted: dict[str, str], celery_app, settings,
        monkeypatch: pytest.MonkeyPatch):
    """beat's tasks.drift_sweep failing on its first page: its run stays, and its retry is a segment."""
    sql(engine, "UPDATE rollout_state SET stage = '100' WHERE id = 1")
    _reads_failing(monkeypatch, connection_reset, times=1)
    celery_app.loader.import_default_modules()
    result = celery_app.tasks["tasks.drift_sweep"].apply().get()
    run_id = result["run_id"]
    assert (result["failed"], result["failures"]) == ("database_unavailable", 1), result
    assert sql(engine, "SELECT state, scanned, errors FROM sweep_run") == [("running", 0, 0)]
    [again] = _sweeps_queue(settings)
    assert (again["task"], again["args"], again["kwargs"]) == ("tasks.sweep_batch", [run_id], {"failures": 1})
    assert _segment(celery_app, run_id, failures=1)["finished"]
    assert sql(engine, "SELECT state, scanned, errors FROM sweep_run") == [("finished", 6, 0)]
    assert _health_errors(engine, runtime) == 0


def test_a_database_failing_past_its_retries_fails_the_sweep_and_counts_once(
        runtime, engine: Engine, corrupted: dict[str, str], celery_app, settings,
        monkeypatch: pytest.MonkeyPatch):
    run_id = _first_segment(engine, runtime)
    _reads_failing(monkeypatch, connection_reset, times=None)
    for failures in range(DB_RETRIES):  # each sent again, none counted
        assert _segment(celery_app, run_id, failures)["failures"] == failures + 1
    assert sql(engine, "SELECT count(*) FROM sweep_error")[0][0] == 0
    with pytest.raises(psycopg2.OperationalError):
        _segment(celery_app, run_id, DB_RETRIES)  # its retries over
    assert sql(engine, "SELECT state, errors FROM sweep_run") == [("failed", 1)]
    assert sql(engine, "SELECT account_id, kind, failure_class FROM sweep_error") == \
        [(None, "failed", "database_unavailable")]
    assert len(_sweeps_queue(settings)) == DB_RETRIES  # the retries sent by the calls above; none after
    assert _health_errors(engine, runtime) == 1


def test_a_bug_fails_the_sweep_at_once_and_counts(
        runtime, engine: Engine, corrupted: dict[str, str], celery_app, settings,
        monkeypatch: pytest.MonkeyPatch):
    run_id = _first_segment(engine, runtime)
    _reads_failing(monkeypatch, lambda: RuntimeError("a bug in the page read"), times=1)
    with pytest.raises(RuntimeError, match="a bug"):
        _segment(celery_app, run_id)
    assert sql(engine, "SELECT state, errors FROM sweep_run") == [("failed", 1)]
    assert sql(engine, "SELECT account_id, kind, failure_class FROM sweep_error") == [(None, "failed", "unexpected")]
    assert _sweeps_queue(settings) == []
    assert _health_errors(engine, runtime) == 1


def test_a_segment_that_recorded_a_page_starts_its_failures_in_a_row_over():
    from app.sweep.sweep import retry_within

    may = retry_within(DB_RETRIES)
    assert not may(FailureKind.DATABASE_UNAVAILABLE, False)
    assert may(FailureKind.DATABASE_UNAVAILABLE, True)
    assert retry_within(DB_RETRIES - 1)(FailureKind.DATABASE_UNAVAILABLE, False)


def test_the_readers_connection_terminated_mid_sweep_is_retried_from_the_cursor(
        runtime, engine: Engine, corrupted: dict[str, str], celery_app, settings,
        monkeypatch: pytest.MonkeyPatch):
    """A real lost connection: the page reader's backend ended by pg_terminate_backend (a failover, an
    idle-session killer) just before it reads its range."""
    run_id = _first_segment(engine, runtime)
    [(cursor,)] = sql(engine, "SELECT cursor FROM sweep_run WHERE id = %(i)s", i=run_id)
    real = batch_read.read_range
    terminated: list[int] = []

    def read_range(conn, after, upto):
        if not terminated:
            pid = conn.connection.dbapi_connection.get_backend_pid()
            terminated.append(pid)
            assert sql(engine, "SELECT pg_terminate_backend(%(p)s)", p=pid) == [(True,)]
        return real(conn, after, upto)

    monkeypatch.setattr(batch_read, "read_range", read_range)
    result = _segment(celery_app, run_id)
    assert (result["failed"], result["failures"]) == ("database_unavailable", 1), result
    assert sql(engine, "SELECT state, errors, cursor FROM sweep_run") == [("running", 0, cursor)]
    done = _segment(celery_app, run_id, failures=1)
    assert done["finished"] and done["scanned"] == 6 and done["errors"] == 0, done
    assert sql(engine, "SELECT count(*) FROM sweep_error")[0][0] == 0
    assert _health_errors(engine, runtime) == 0


def test_a_blip_storing_a_pages_remediation_requests_reads_the_page_again(
        runtime, engine: Engine, corrupted: dict[str, str], celery_app, settings,
        monkeypatch: pytest.MonkeyPatch):
    """The database lost while the page's DRIFT_DETECTED requests are stored: before, one sweep error
    of the page (kind 'request'), counted by the gate, and its remediations left to the next sweep.
    Now the segment is sent again and the page read again: its requests are stored then."""
    from app.sweep import sweep as sweep_module

    run_id = _first_segment(engine, runtime)
    real = sweep_module.request_recompute
    calls: list[str] = []

    def request_recompute(conn, account_id, *args: Any, **kwargs: Any) -> bool:
        calls.append(account_id)
        if len(calls) == 1:
            raise connection_reset()
        return bool(real(conn, account_id, *args, **kwargs))

    monkeypatch.setattr(sweep_module, "request_recompute", request_recompute)
    result = _segment(celery_app, run_id)
    assert (result["failed"], result["failures"]) == ("database_unavailable", 1), result
    done = _segment(celery_app, run_id, failures=1)
    assert done["finished"] and done["errors"] == 0 and done["enqueued"] >= 1, done
    assert sql(engine, "SELECT count(*) FROM sweep_error")[0][0] == 0
    requested = {r[0] for r in sql(engine, "SELECT account_id FROM recompute_request WHERE trigger = 'DRIFT_DETECTED'")}
    assert calls[0] in requested
    assert _health_errors(engine, runtime) == 0


def test_dunning_sweep_waits_out_a_blip_and_reads_on_from_its_cursor(
        cli_env: None, engine: Engine, corrupted: dict[str, str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]):
    """The command line's sweep (one process) retries as the task does, waiting in-process."""
    from types import SimpleNamespace

    from app.cli import main
    from app.sweep import cli as sweep_cli

    waits: list[float] = []
    monkeypatch.setattr(sweep_cli, "time", SimpleNamespace(sleep=waits.append))
    real = batch_read.read_range
    second = sorted(corrupted.values())[1]  # where the second range (pages of 2) starts
    reads: list[str] = []

    def read_range(conn, after, upto):  # the second range fails once
        reads.append(after)
        if after == second and reads.count(second) == 1:
            raise connection_reset()
        return real(conn, after, upto)

    monkeypatch.setattr(batch_read, "read_range", read_range)
    assert main(["sweep", "--batch-size", "2"]) == 0, capsys.readouterr().err
    assert "failed (database_unavailable); reading on from its cursor" in capsys.readouterr().err
    assert len(waits) == 1 and 2.0 <= waits[0] <= 4.0  # the database class's first backoff, with jitter
    assert (reads.count(second), reads.count("")) == (2, 1)  # the failed range read again, never the first
    assert sql(engine, "SELECT state, scanned, errors FROM sweep_run") == [("finished", 6, 0)]
    assert sql(engine, "SELECT count(*) FROM sweep_error")[0][0] == 0


def test_ctrl_c_while_dunning_sweep_waits_to_retry_closes_the_run_interrupted(
        cli_env: None, engine: Engine, corrupted: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    from types import SimpleNamespace

    from app.cli import main
    from app.sweep import cli as sweep_cli

    def ctrl_c(_seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_cli, "time", SimpleNamespace(sleep=ctrl_c))
    _reads_failing(monkeypatch, connection_reset, times=1)
    assert main(["sweep"]) == 130
    assert sql(engine, "SELECT state, errors FROM sweep_run") == [("interrupted", 0)]
    assert sql(engine, "SELECT count(*) FROM sweep_error")[0][0] == 0
    assert main(["sweep"]) == 0  # the next sweep runs


def test_a_page_read_cancelled_by_its_statement_timeout_is_lock_contention_and_retried(
        runtime, engine: Engine, corrupted: dict[str, str], celery_app, settings,
        monkeypatch: pytest.MonkeyPatch):
    """PostgreSQL cancels the page's statement (57014: a lock or statement timeout behind a long lock)."""
    run_id = _first_segment(engine, runtime)
    real = batch_read.read_range
    cancelled: list[str] = []

    def read_range(conn, after, upto):
        if not cancelled:
            cancelled.append(after)
            conn.exec_driver_sql("SET LOCAL statement_timeout = 1")
            conn.exec_driver_sql("SELECT pg_sleep(5)")  # cancelled after 1 ms
        return real(conn, after, upto)

    monkeypatch.setattr(batch_read, "read_range", read_range)
    result = _segment(celery_app, run_id)
    assert (result["failed"], result["failures"]) == ("lock_contention", 1), result
    [again] = _sweeps_queue(settings)
    assert again["kwargs"] == {"failures": 1}
    assert _segment(celery_app, run_id, failures=1)["finished"]
    assert sql(engine, "SELECT state, scanned, errors FROM sweep_run") == [("finished", 6, 0)]
    assert sql(engine, "SELECT count(*) FROM sweep_error")[0][0] == 0


def test_the_sweeps_own_failure_goes_on_when_its_lock_connection_is_lost_too(engine: Engine):
    """A failover takes the sweep lock's session with it: unlocking then fails too. The error that goes
    on to be classified (and retried, or counted) is the sweep's own, not the unlock's; the lock went
    with the session."""
    from app.sweep.lock import SWEEP_LOCK_KEY, sweep_lock

    with pytest.raises(RuntimeError, match="the sweep's own failure"), sweep_lock(engine):
        [(pid,)] = sql(engine, "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = %(hi)s "
                       "AND objid = %(lo)s AND objsubid = 1",
                       hi=SWEEP_LOCK_KEY >> 32, lo=SWEEP_LOCK_KEY & 0xFFFFFFFF)
        assert sql(engine, "SELECT pg_terminate_backend(%(p)s)", p=pid) == [(True,)]
        raise RuntimeError("the sweep's own failure")
    with sweep_lock(engine):  # free again
        pass


def test_a_page_whose_record_fails_counts_its_drift_once_when_read_again(
        runtime, engine: Engine, corrupted: dict[str, str], celery_app, settings,
        monkeypatch: pytest.MonkeyPatch):
    """DESIGN 9's drift found: the page's drifted accounts were counted before its record committed. A
    blip in that write sends the segment again, which reads the page again and finds them again: each
    drift counted twice (the sweep_run's drifted, written with the record, once)."""
    from app import metrics
    from app.sweep import sweep

    real = sweep._record_errors
    calls: list[int] = []

    def record_errors(conn, report, now):
        calls.append(1)
        if len(calls) == 1:
            raise connection_reset()
        return real(conn, report, now)

    monkeypatch.setattr(sweep, "_record_errors", record_errors)
    found = metrics.DRIFT_FOUND.labels("false")  # the stage is off: found, none in stage
    before = found._value.get()
    celery_app.loader.import_default_modules()
    result = celery_app.tasks["tasks.drift_sweep"].apply().get()
    assert (result["failed"], result["failures"]) == ("database_unavailable", 1), result
    assert _segment(celery_app, result["run_id"], failures=1)["finished"]
    assert sql(engine, "SELECT state, drifted FROM sweep_run") == [("finished", 3)]
    assert found._value.get() - before == 3


def test_remediations_sent_by_a_page_whose_record_fails_are_recorded_and_counted_once(
        runtime, engine: Engine, corrupted: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """DESIGN 6 and 9: the gate judges remediations by their drift_record rows. A page's remediations
    were recorded only with the page, after they were sent: a blip in that write sent the segment
    again, whose second reading of the page found them pending (their requests), not drifted, so
    they were sent but never recorded (a reverted one unseen by the gate), counted nowhere (sweep_run,
    dunning_drift_remediated_total). Now they are recorded with their requests, and counted once."""
    from app import metrics
    from app.sweep import sweep
    from app.sweep.sweep import Sweeper, SweepRetry, retry_within
    from tests.integration.test_sweep import Recorder, set_stage

    in_stage = sorted([corrupted["paid"], corrupted["flagged"]])
    set_stage(engine, "named", in_stage)
    real = sweep._record_errors
    calls: list[int] = []

    def record_errors(conn, report, now):
        calls.append(1)
        if len(calls) == 1:  # the first page's record
            raise connection_reset()
        return real(conn, report, now)

    monkeypatch.setattr(sweep, "_record_errors", record_errors)
    found, remediated = metrics.DRIFT_FOUND.labels("true"), metrics.DRIFT_REMEDIATED
    before = (found._value.get(), remediated._value.get())
    sent = Recorder()
    sweeper = Sweeper(engine, runtime.policy, sent, retry=retry_within(0))
    with pytest.raises(SweepRetry) as retried:
        sweeper.start()
    assert sweeper.resume(retried.value.run_id).finished
    assert sorted(account for account, _ in sent.sent) == in_stage  # each sent once
    assert sql(engine, "SELECT account_id, remediated, skipped, stage FROM drift_record ORDER BY account_id") == [
        (in_stage[0], True, None, "named"), (in_stage[1], True, None, "named"),
        (corrupted["unpaid"], False, "out_of_stage", "named")]
    assert sql(engine, "SELECT state, drifted, in_stage, enqueued, errors FROM sweep_run") == [("finished", 3, 2, 2, 0)]
    assert (found._value.get() - before[0], remediated._value.get() - before[1]) == (2, 2)
