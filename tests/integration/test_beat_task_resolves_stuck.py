"""A beat task given up (a dead or retrying subs_stuck_events row, under no account) is resolved by
its next tick that succeeds: the tick does the same work whole, so the row had nothing left to do.
Only a re-drive of that very row resolved it (a retrying row's, up to 5 minutes later), and a dead
row is never re-driven by beat: ops and the
support page listed the relay's failure of last week as dead stuck work for as long as the history
kept it (DESIGN section 8: a row resolved when the work later succeeds)."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from app.db import DatabaseUnavailable
from app.dispatch import send
from tasks.failures import POLICIES, classify
from tests.conftest import wait_for

pytestmark = pytest.mark.worker


def states(engine: Engine, task: str) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.exec_driver_sql(
            "SELECT state FROM subs_stuck_events WHERE task_name = %(t)s ORDER BY id", {"t": task})]


def give_up(celery_app, task_name: str, exc: Exception) -> None:
    """The task's last own retry failing, as the worker runs it."""
    from tasks.recompute import handle_failure

    task = celery_app.tasks[task_name]
    task.push_request(retries=POLICIES[classify(exc)].max_retries, id=f"given-up-{task_name}")
    try:
        with pytest.raises(type(exc)):
            handle_failure(task, exc, None, {})
    finally:
        task.pop_request()


@pytest.mark.parametrize("task_name", ["tasks.relay_outbox", "tasks.dispatch_due_retries"])
@pytest.mark.parametrize(("exc", "state"), [(AttributeError("a bug, since fixed"), "dead"),
                                            (DatabaseUnavailable("database connection lost"), "retrying")])
def test_the_next_tick_that_succeeds_resolves_a_beat_tasks_stuck_row(celery_app, engine, clean, worker, task_name,
                                                                     exc, state):
    give_up(celery_app, task_name, exc)
    assert states(engine, task_name) == [state]
    send(celery_app, task_name)  # beat's next tick, on the real broker and worker
    wait_for(lambda: states(engine, task_name) == ["resolved"], message=f"{task_name}'s row resolved")


def test_a_task_run_without_arguments_that_beat_does_not_send_leaves_the_rows_alone(celery_app, engine, clean):
    """Only a beat task's tick does its given-up tick's work again. tasks.noop (the canary an operator
    sends through a queue, and the benchmarks' baseline) also runs without arguments: its success
    wrote to the database, so the canary touched the database on every call (and logged a failure
    while the database was down), and it resolved the dead row its killed run left."""
    from tasks.stuck import _resolve_redriven

    celery_app.loader.import_default_modules()  # the worker's task modules, as a worker imports them

    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO subs_stuck_events (task_name, task_args, error_class, error, state) "
                             "VALUES ('tasks.noop', '{}', 'killed', 'WorkerLostError', 'dead')")
    give_up(celery_app, "tasks.relay_outbox", AttributeError("a bug, since fixed"))
    for name in ("tasks.noop", "tasks.relay_outbox"):
        task = celery_app.tasks[name]
        task.push_request(id=f"tick-{name}", args=[], kwargs={})
        try:
            _resolve_redriven(sender=task, result=None)  # task_success, as the worker sends it
        finally:
            task.pop_request()
    assert states(engine, "tasks.noop") == ["dead"]
    assert states(engine, "tasks.relay_outbox") == ["resolved"]  # a beat task's tick still resolves its rows


@pytest.mark.parametrize("task_name", ["tasks.dispatch_due_retries", "tasks.fetch_attempt_detail",
                                       "tasks.settle_unsettled_bad_debt_payments",
                                       "tasks.reconcile_bad_debt_payments"])
def test_a_tick_skipped_for_want_of_a_stripe_key_leaves_the_row_of_the_tick_that_failed(
        celery_app, engine, clean, runtime, monkeypatch, task_name):
    """Without STRIPE_API_KEY these ticks do nothing (nothing asked, nothing claimed): the work the
    given-up tick left is still to do, so its row stays for the tick that does it."""
    celery_app.loader.import_default_modules()
    give_up(celery_app, task_name, DatabaseUnavailable("database connection lost"))
    monkeypatch.setattr(runtime, "settings", runtime.settings.with_overrides(stripe_api_key=""))
    result = celery_app.tasks[task_name].apply().get()
    assert "STRIPE_API_KEY" in str(result.get("skipped"))
    assert states(engine, task_name) == ["retrying"]
