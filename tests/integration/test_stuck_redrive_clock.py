"""Beat's re-drive of stuck work (tasks.redrive_stuck) times a row by the database's clock, the one
that set its re-drive time (record_stuck: now() + 5 minutes at its last failure), not by the clock
of the host beat's tick runs on. With the worker's clock, a host 10 minutes ahead of the database
re-drove a row the moment it was written, while the task that wrote it was still retrying itself
(two runs of one payment retry or recompute at once, the re-drive's success resolving a row whose
task kept failing), and a host behind it held every row back by as much."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from freezegun import freeze_time

from tasks.failures import FailureKind, record_stuck

pytestmark = pytest.mark.usefixtures("clean")


def row(engine, account: str) -> dict:
    with engine.connect() as conn:
        return dict(conn.exec_driver_sql("SELECT state, next_redrive_at, now() AS db_now FROM subs_stuck_events "
                                         "WHERE account_id = %(a)s", {"a": account}).mappings().one())


@pytest.mark.parametrize("worker_ahead", [timedelta(minutes=10), timedelta(hours=1)])
def test_a_row_is_not_redriven_before_its_time_by_a_host_whose_clock_is_ahead(celery_app, engine, accounts,
                                                                              worker_ahead):
    import tasks.stuck  # noqa: F401  (registers the task)

    account, _ = accounts.create()
    # A recompute's second failure in a row (the database failing over): it keeps retrying itself.
    record_stuck(engine, "tasks.recompute_account", {"account_id": account, "trigger": "MANUAL", "cause": None},
                 account, FailureKind.DATABASE_UNAVAILABLE, "DatabaseUnavailable: database connection lost", 2,
                 "retrying")
    before = row(engine, account)
    assert before["next_redrive_at"] - before["db_now"] > timedelta(minutes=4)
    try:
        with freeze_time(datetime.now(UTC) + worker_ahead, tick=True):  # beat's tick on a host ahead
            report = celery_app.tasks["tasks.redrive_stuck"].apply().get()
        assert report["due"] == 0 and report["sent"] == 0
        assert row(engine, account)["next_redrive_at"] == before["next_redrive_at"]
    finally:
        celery_app.control.purge()


def test_a_row_whose_time_came_is_redriven_by_a_host_whose_clock_is_behind(celery_app, engine, accounts):
    import tasks.stuck  # noqa: F401  (registers the task)

    account, _ = accounts.create()
    record_stuck(engine, "tasks.recompute_account", {"account_id": account, "trigger": "MANUAL", "cause": None},
                 account, FailureKind.DATABASE_UNAVAILABLE, "DatabaseUnavailable: database connection lost", 11,
                 "retrying")
    with engine.begin() as conn:  # its 5 minutes are over, by the database's clock
        conn.exec_driver_sql("UPDATE subs_stuck_events SET next_redrive_at = now() - interval '1 second' "
                             "WHERE account_id = %(a)s", {"a": account})
    try:
        with freeze_time(datetime.now(UTC) - timedelta(hours=1), tick=True):  # beat's tick on a host behind
            report = celery_app.tasks["tasks.redrive_stuck"].apply().get()
        assert report["due"] == 1 and report["sent"] == 1
        after = row(engine, account)
        assert after["state"] == "retrying" and after["next_redrive_at"] - after["db_now"] > timedelta(minutes=4)
    finally:
        celery_app.control.purge()
