"""History retention (app/history/prune.py, tasks.prune_history, `dunning history prune`): rows older
than HISTORY_RETENTION_DAYS go, younger ones and the ones something still reads stay."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from freezegun import freeze_time
from prometheus_client import REGISTRY
from psycopg2.extras import Json
from sqlalchemy import Connection, Engine

from app.cli import main
from app.db import session_lock
from app.domain.policy import Policy
from app.domain.rollout import Health, RolloutStatus, health_since, rollout_policy
from app.history.prune import HISTORIES, LOCK, TABLES, count_due, prune
from app.rollout.gate import measure
from tasks import queues
from tasks.schedule import BEAT_SCHEDULE
from tests.stripe_events import unique

NOW = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)
DAYS = 90
OLD = NOW - timedelta(days=DAYS + 1)
YOUNG = NOW - timedelta(days=DAYS - 1)
ANCIENT = NOW - timedelta(days=400)

_sweep_ids = itertools.count(10**9)  # sweeps with no sweep_run row (none running): their rows may go


# --- rows as the product writes them, at a given time ----------------------------------------------


def sweep_run(conn: Connection, at: datetime, state: str = "finished") -> int:
    finished = None if state == "running" else at
    return int(conn.exec_driver_sql(
        "INSERT INTO sweep_run (started_at, finished_at, updated_at, state) "
        "VALUES (%(started)s, %(finished)s, %(at)s, %(state)s) RETURNING id",
        {"started": at - timedelta(minutes=10), "finished": finished, "at": at, "state": state}).scalar_one())


def sweep_error(conn: Connection, at: datetime, sweep_id: int | None = None, account: str | None = None) -> int:
    return int(conn.exec_driver_sql(
        "INSERT INTO sweep_error (sweep_id, account_id, kind, at) VALUES (%(sweep)s, %(account)s, 'compute', %(at)s) "
        "RETURNING id",
        {"sweep": next(_sweep_ids) if sweep_id is None else sweep_id, "account": account or unique("acct"),
         "at": at}).scalar_one())


def drift_record(conn: Connection, at: datetime, sweep_id: int | None = None, account: str | None = None) -> int:
    return int(conn.exec_driver_sql(
        "INSERT INTO drift_record (sweep_id, account_id, found_at, stored, desired, fields, remediated, stage) "
        "VALUES (%(sweep)s, %(account)s, %(at)s, %(stored)s, %(desired)s, %(fields)s, true, '5') RETURNING id",
        {"sweep": next(_sweep_ids) if sweep_id is None else sweep_id, "account": account or unique("acct"),
         "at": at, "stored": Json({"level": "none"}), "desired": Json({"level": "warn"}), "fields": Json(["level"])},
    ).scalar_one())


def outbox(conn: Connection, delivered_at: datetime | None, state: str = "delivered",
           created_at: datetime | None = None, blocked_at: datetime | None = None) -> int:
    created = created_at or (delivered_at or NOW) - timedelta(seconds=5)
    return int(conn.exec_driver_sql(
        "INSERT INTO outbox (account_id, dunning_version, event_type, payload, created_at, next_attempt_at, "
        "delivered_at, state, blocked_at, attempts) VALUES (%(account)s, 1, 'EntitlementsChanged', %(payload)s, "
        "%(created)s, %(created)s, %(delivered)s, %(state)s, %(blocked)s, 1) RETURNING id",
        {"account": unique("acct"), "payload": Json({"entitlements": {}}), "created": created,
         "delivered": delivered_at, "state": state, "blocked": blocked_at}).scalar_one())


def stuck(conn: Connection, resolved_at: datetime | None, state: str = "resolved",
          failed_at: datetime | None = None, account: str | None = None) -> int:
    failed = failed_at or (resolved_at or NOW) - timedelta(minutes=5)
    return int(conn.exec_driver_sql(
        "INSERT INTO subs_stuck_events (account_id, task_name, task_args, error_class, error, state, "
        "first_failed_at, last_failed_at, resolved_at) VALUES (%(account)s, 'tasks.recompute_account', "
        "%(args)s, 'database_unavailable', 'OperationalError: gone', %(state)s, %(failed)s, %(failed)s, "
        "%(resolved)s) RETURNING id",
        {"account": account or unique("acct"), "args": Json({"trigger": "DRIFT_DETECTED"}), "state": state,
         "failed": failed,
         "resolved": resolved_at}).scalar_one())


# A row of each table that is done with, at the time its age is read from.
DONE: dict[str, Callable[[Connection, datetime], int]] = {
    "sweep_error": sweep_error,
    "drift_record": drift_record,
    "sweep_run": sweep_run,
    "outbox": outbox,
    "subs_stuck_events": stuck,
}


def insert(engine: Engine, make: Callable[[Connection], int]) -> int:
    with engine.begin() as conn:
        return make(conn)


def done(engine: Engine, table: str, at: datetime) -> int:
    """A row of ``table`` done with at ``at``."""
    return insert(engine, lambda c: DONE[table](c, at))


def ids(engine: Engine, table: str) -> set[int]:
    with engine.connect() as conn:
        return {int(r[0]) for r in conn.exec_driver_sql(f"SELECT id FROM {table}")}


def pruned_total(table: str) -> float:
    return REGISTRY.get_sample_value("dunning_history_pruned_total", {"table": table}) or 0.0


def with_window(policy: Policy, hours: float) -> Policy:
    """The policy with another rollout health window."""
    rollout = {**policy.extra.get("rollout", {}), "health_window_hours": hours}
    return dataclasses.replace(policy, extra={**policy.extra, "rollout": rollout})


def test_every_table_that_is_pruned_has_a_row_maker_here():
    assert set(DONE) == set(TABLES)


# --- older rows go, younger ones stay --------------------------------------------------------------


@pytest.mark.parametrize("table", TABLES)
def test_rows_older_than_the_retention_go_and_younger_ones_stay(engine: Engine, runtime, clean, table: str):
    old = done(engine, table, OLD)
    young = done(engine, table, YOUNG)
    counted = pruned_total(table)
    with freeze_time(NOW):
        report = prune(engine, runtime.policy, DAYS)
    assert ids(engine, table) == {young}
    assert old not in ids(engine, table)
    assert report.removed == {t: (1 if t == table else 0) for t in TABLES}
    assert report.finished and report.skipped is None
    assert pruned_total(table) == counted + 1


def test_a_dry_run_counts_what_would_go_and_removes_nothing(engine: Engine, runtime, clean):
    made = {table: [done(engine, table, OLD) for _ in range(2)] for table in TABLES}
    with freeze_time(NOW):
        report = count_due(engine, runtime.policy, DAYS)
    assert report.dry_run and report.removed == dict.fromkeys(TABLES, 2)
    for table, rows in made.items():
        assert ids(engine, table) == set(rows)


# --- what something still reads stays, whatever its age --------------------------------------------


def test_an_outbox_row_the_relay_is_not_done_with_stays(engine: Engine, runtime, clean):
    pending = insert(engine, lambda c: outbox(c, None, "pending", created_at=ANCIENT))
    blocked = insert(engine, lambda c: outbox(c, None, "pending", created_at=ANCIENT, blocked_at=ANCIENT))
    superseded = insert(engine, lambda c: outbox(c, ANCIENT, "superseded"))
    skipped = insert(engine, lambda c: outbox(c, ANCIENT, "skipped"))
    with freeze_time(NOW):
        report = prune(engine, runtime.policy, DAYS)
    assert ids(engine, "outbox") == {pending, blocked}
    assert {superseded, skipped}.isdisjoint(ids(engine, "outbox")) and report.removed["outbox"] == 2


@pytest.mark.parametrize("state", ["retrying", "dead"])
def test_stuck_work_not_resolved_stays(engine: Engine, runtime, clean, state: str):
    open_row = insert(engine, lambda c: stuck(c, None, state, failed_at=ANCIENT))
    resolved = insert(engine, lambda c: stuck(c, ANCIENT))
    with freeze_time(NOW):
        prune(engine, runtime.policy, DAYS)
    assert ids(engine, "subs_stuck_events") == {open_row}
    assert resolved not in ids(engine, "subs_stuck_events")


def test_a_running_sweep_keeps_its_run_its_errors_and_its_drift(engine: Engine, runtime, clean):
    running = insert(engine, lambda c: sweep_run(c, ANCIENT, "running"))
    error = insert(engine, lambda c: sweep_error(c, ANCIENT, running))
    drift = insert(engine, lambda c: drift_record(c, ANCIENT, running))
    finished = insert(engine, lambda c: sweep_run(c, ANCIENT))
    finished_error = insert(engine, lambda c: sweep_error(c, ANCIENT, finished))
    with freeze_time(NOW):
        report = prune(engine, runtime.policy, DAYS)
    assert ids(engine, "sweep_run") == {running}
    assert ids(engine, "sweep_error") == {error} and finished_error not in ids(engine, "sweep_error")
    assert ids(engine, "drift_record") == {drift}
    assert (report.removed["sweep_run"], report.removed["sweep_error"]) == (1, 1)


def _gate_rows(conn: Connection, at: datetime, account: str | None = None) -> dict[str, int]:
    """What the gate counts, at ``at``: a finished sweep, its remediation of ``account``, an error of
    the current stage."""
    run = sweep_run(conn, at)
    return {"sweep_run": run, "drift_record": drift_record(conn, at, run, account),
            "sweep_error": sweep_error(conn, at, run)}


def _health(engine: Engine, policy: Policy, stage_entered: datetime) -> Health:
    status = RolloutStatus("5", False, stage_entered)
    with engine.connect() as conn:
        return measure(conn, health_since(status, rollout_policy(policy.extra), NOW))


def test_what_the_rollout_gate_counts_stays_even_past_the_retention(engine: Engine, runtime, clean):
    """A health window longer than the retention (refused at start: check_retention) still keeps the
    current stage's sweeps, remediations and errors the gate counts; older ones go."""
    policy = with_window(runtime.policy, 120 * 24)
    with engine.begin() as conn:
        counted = _gate_rows(conn, NOW - timedelta(days=100))
        beyond = _gate_rows(conn, NOW - timedelta(days=130))
        stuck_in_window = stuck(conn, NOW - timedelta(days=100))  # not the gate's: the retention holds
    before = _health(engine, policy, NOW - timedelta(days=200))
    with freeze_time(NOW):
        prune(engine, policy, DAYS)
    for table, row in counted.items():
        assert ids(engine, table) == {row}, table
    for table, row in beyond.items():
        assert row not in ids(engine, table), table
    assert stuck_in_window not in ids(engine, "subs_stuck_events")
    after = _health(engine, policy, NOW - timedelta(days=200))
    assert after == before and (after.sweeps, after.remediations, after.errors) == (1, 1, 1)


def test_the_gate_reads_the_same_health_after_a_prune(engine: Engine, runtime, clean):
    """A stage entered long ago: its errors older than the health window are read by nothing."""
    account = unique("acct")
    with engine.begin() as conn:
        today = _gate_rows(conn, NOW - timedelta(hours=2), account)
        past_window = _gate_rows(conn, NOW - timedelta(days=DAYS + 10))
        # today's remediation failed for good: reverted
        dead = stuck(conn, None, "dead", failed_at=NOW - timedelta(hours=1), account=account)
    before = _health(engine, runtime.policy, NOW - timedelta(days=365))
    with freeze_time(NOW):
        prune(engine, runtime.policy, DAYS)
    assert _health(engine, runtime.policy, NOW - timedelta(days=365)) == before
    assert (before.remediations, before.reverted, before.errors, before.sweeps) == (1, 1, 1, 1)
    for table, row in today.items():
        assert ids(engine, table) == {row}, table
    for table, row in past_window.items():
        assert row not in ids(engine, table), table
    assert ids(engine, "subs_stuck_events") == {dead}


NEVER_PRUNED = {
    "stripe_event": "INSERT INTO stripe_event (id, type, stripe_created, state, raw_body, received_at) "
                    "VALUES (%(key)s, 'invoice.paid', 1, 'accepted', '{}', %(at)s)",
    "audit_log": "INSERT INTO audit_log (at, actor, action) VALUES (%(at)s, 'alice', 'recompute')",
    "rollout_history": "INSERT INTO rollout_history (at, action, from_stage, to_stage, actor, reason) "
                       "VALUES (%(at)s, 'advance', 'off', 'named', 'alice', 'pilot')",
    "payment_retry": "INSERT INTO payment_retry (account_id, invoice_id, retry_number, idempotency_key, "
                     "scheduled_for, state, created_at, updated_at) "
                     "VALUES (%(key)s, 'in_1', 1, %(key)s, %(at)s, 'sent', %(at)s, %(at)s)",
    "bad_debt_payment": "INSERT INTO bad_debt_payment (account_id, idempotency_key, request_fingerprint, amount, "
                        "state, created_at, updated_at) "
                        "VALUES (%(key)s, %(key)s, 'f', 100, 'succeeded', %(at)s, %(at)s)",
    "bad_debt_episode": "INSERT INTO bad_debt_episode (account_id, entered_at, reason, exited_at) "
                        "VALUES (%(key)s, %(at)s, 'retries_exhausted', %(at)s)",
}


def test_the_inbox_audit_and_money_records_are_never_pruned(engine: Engine, runtime, clean):
    with engine.begin() as conn:
        for statement in NEVER_PRUNED.values():
            conn.exec_driver_sql(statement, {"key": unique("k"), "at": NOW - timedelta(days=3650)})
    with freeze_time(NOW):
        prune(engine, runtime.policy, DAYS)
    with engine.connect() as conn:
        for table in NEVER_PRUNED:
            assert conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one() >= 1, table
    assert not set(NEVER_PRUNED) & {h.table for h in HISTORIES}


# --- batches, the time budget, one at a time -------------------------------------------------------


def test_a_small_batch_removes_everything_across_batches(engine: Engine, runtime, clean):
    for table in TABLES:
        for n in range(7):
            done(engine, table, OLD - timedelta(hours=n))
    young = {table: done(engine, table, YOUNG) for table in TABLES}
    with freeze_time(NOW):
        report = prune(engine, runtime.policy, DAYS, batch_size=3)
    assert report.removed == dict.fromkeys(TABLES, 7) and report.finished
    for table in TABLES:
        assert ids(engine, table) == {young[table]}, table


class Ticks:
    """A clock that moves one second each time it is read."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def test_a_spent_time_budget_leaves_the_rest_to_the_next_run(engine: Engine, runtime, clean):
    for n in range(7):
        done(engine, "outbox", OLD - timedelta(hours=n))
    with freeze_time(NOW):
        # one batch of each table (the others empty), then one more of the outbox's, then the budget is spent
        first = prune(engine, runtime.policy, DAYS, batch_size=2, budget_seconds=len(TABLES) + 2, clock=Ticks())
        assert not first.finished and first.removed["outbox"] == 4
        assert len(ids(engine, "outbox")) == 3
        second = prune(engine, runtime.policy, DAYS, batch_size=2)
    assert second.finished and second.removed["outbox"] == 3 and ids(engine, "outbox") == set()


def test_one_prune_at_a_time(engine: Engine, runtime, clean):
    old = insert(engine, lambda c: outbox(c, OLD))
    with session_lock(engine, LOCK) as got, freeze_time(NOW):
        assert got
        report = prune(engine, runtime.policy, DAYS)
    assert report.skipped == "another history prune is running"
    assert report.removed == dict.fromkeys(TABLES, 0) and ids(engine, "outbox") == {old}


# --- beat and the CLI ------------------------------------------------------------------------------


def test_beat_prunes_hourly_on_the_maintenance_queue(engine: Engine, clean, celery_app):
    import tasks.history  # noqa: F401  (registers the task, as the worker's include does)

    [entry] = [e for e in BEAT_SCHEDULE.values() if e["task"] == "tasks.prune_history"]
    assert entry["schedule"] == 3600.0
    assert celery_app.amqp.router.route({}, "tasks.prune_history")["queue"].name == queues.MAINTENANCE
    # The task itself, on the real clock: the session's settings keep the default 90 days.
    old = insert(engine, lambda c: outbox(c, datetime.now(UTC) - timedelta(days=200)))
    young = insert(engine, lambda c: outbox(c, datetime.now(UTC) - timedelta(days=10)))
    result = celery_app.tasks["tasks.prune_history"].apply().get()
    assert result["removed"]["outbox"] == 1 and result["finished"] and result["retention_days"] == 90
    assert ids(engine, "outbox") == {young} and old not in ids(engine, "outbox")


def test_the_cli_prints_what_it_would_remove_and_removes_it(engine: Engine, clean, cli_env, capsys):
    old = insert(engine, lambda c: stuck(c, datetime.now(UTC) - timedelta(days=200)))
    assert main(["history", "prune", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove (dry run, nothing removed)" in out and "subs_stuck_events  1" in out
    assert ids(engine, "subs_stuck_events") == {old}
    assert main(["history", "prune"]) == 0
    out = capsys.readouterr().out
    assert "older than 90 days" in out and "removed" in out and "subs_stuck_events  1" in out
    assert ids(engine, "subs_stuck_events") == set()


def test_the_cli_refuses_a_retention_shorter_than_the_gate_reads(engine: Engine, clean, cli_env, capsys,
                                                                  monkeypatch, tmp_path):
    from app.policy_file import DEFAULT_POLICY

    policy = tmp_path / "policy.toml"
    policy.write_text(DEFAULT_POLICY.read_text().replace("health_window_hours = 24", "health_window_hours = 72"))
    monkeypatch.setenv("DUNNING_POLICY", str(policy))
    monkeypatch.setenv("HISTORY_RETENTION_DAYS", "2")
    old = insert(engine, lambda c: stuck(c, datetime.now(UTC) - timedelta(days=200)))
    assert main(["history", "prune"]) == 2
    err = capsys.readouterr().err
    assert "HISTORY_RETENTION_DAYS is 2" in err and "at least 3" in err
    assert ids(engine, "subs_stuck_events") == {old}
