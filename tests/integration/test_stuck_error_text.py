"""The error a stuck row shows (subs_stuck_events.error, on /ops/stuck-events and the support page)
names what failed and, for a database error, its SQLSTATE, PostgreSQL's message and the statement,
but never the values the statement carried: neither SQLAlchemy's ``[parameters: ...]`` nor the
``DETAIL`` that quotes the row (DESIGN section 8: what ops and support see of a give-up)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine

from app.db import Prepared, fetch_prepared_row, unit_of_work

pytestmark = pytest.mark.worker

EMAIL = "ana.secret@example.com"


def stuck_error(engine: Engine, account: str) -> tuple[str, str, str]:
    with engine.connect() as conn:
        (row,) = conn.exec_driver_sql("SELECT state, error_class, error FROM subs_stuck_events "
                                      "WHERE account_id = %(a)s", {"a": account}).fetchall()
    return row[0], row[1], row[2]


def twice_through_sqlalchemy(engine: Engine, account: str) -> None:
    """A unique violation on a statement run through SQLAlchemy (an IntegrityError, wrapping the
    driver's error with the statement and its parameters)."""
    with engine.begin() as conn:
        for _ in range(2):
            conn.exec_driver_sql("INSERT INTO subs_dunning (account_id, status, level) VALUES (%(a)s, %(s)s, 'x')",
                                 {"a": account, "s": EMAIL})


NULL_LEVEL = Prepared("stuck_text_null_level",
                      "INSERT INTO subs_dunning (account_id, status, level) VALUES ($1, $2, NULL)",
                      ("text", "text"))


def null_on_the_hot_path(engine: Engine, account: str) -> None:
    """A not-null violation on a hot path's prepared statement (ValueRejected, whose driver error's
    DETAIL quotes the failing row)."""
    with unit_of_work(engine) as conn:
        fetch_prepared_row(conn, (NULL_LEVEL, (account, EMAIL)))


def bad_int(engine: Engine, account: str) -> None:
    """A data exception (class 22), whose message quotes the value PostgreSQL refused."""
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT %(v)s::int", {"v": EMAIL})


def bad_int_quoted(engine: Engine, account: str) -> None:
    """A data exception whose refused value holds a double quote: PostgreSQL quotes the value without
    escaping it, so only the text between the first and the last quote is the value."""
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT %(v)s::int", {"v": f'x" {EMAIL} "y'})


def literal_in_a_syntax_error(engine: Engine, account: str) -> None:
    """A syntax error at a parameter: psycopg2 inlines the values, and PostgreSQL's message quotes the
    token it stopped at, here the value's literal."""
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT %(a)s %(b)s", {"a": "x", "b": EMAIL})


@pytest.mark.parametrize("fail", [twice_through_sqlalchemy, null_on_the_hot_path, bad_int, bad_int_quoted,
                                  literal_in_a_syntax_error])
def test_a_dead_recompute_shows_the_database_error_without_the_values(celery_app, accounts, engine, monkeypatch,
                                                                      fail):
    import tasks.recompute as recompute

    account, _ = accounts.create()

    def failing_run(eng: Engine, *args: Any, **kwargs: Any) -> None:
        fail(eng, account)

    monkeypatch.setattr(recompute, "run_recompute", failing_run)
    result = celery_app.tasks["tasks.recompute_account"].apply(args=[account, "PAYMENT_FAILED", "evt_1"])
    assert result.failed()
    state, error_class, error = stuck_error(engine, account)
    assert state == "dead" and error_class in ("invalid_data", "unexpected"), error
    assert EMAIL not in error, error
    assert "parameters" not in error and "DETAIL" not in error, error
    # what failed is still there: the driver's error and its SQLSTATE
    assert any(code in error for code in ("23505", "23502", "22P02", "42601")), error


@pytest.mark.parametrize("text", ["a lone surrogate \ud83d from the answer", "a NUL \x00 byte in the answer"])
def test_a_give_up_whose_error_text_the_database_cannot_take_is_still_recorded(celery_app, accounts, engine, text):
    """An error's text holds what a remote side sent (a Stripe error's message, a proxy's answer
    before it): a lone surrogate (JSON's "\\ud83d", which json.loads keeps) has no UTF-8, so
    psycopg2 could not send the row, and record_stuck, taking that for a failure that does not pass,
    answered "recorded": the task gave up as dead with no row, its work dropped, seen nowhere. The
    text is kept with the character escaped, as the outbox keeps an answer's (app/outbox/relay.py)."""
    import tasks.recompute  # noqa: F401  (registers the task)
    from tasks.failures import FailureKind, TaskFailure
    from tasks.recompute import handle_failure

    account, _ = accounts.create()
    task = celery_app.tasks["tasks.recompute_account"]
    refused = TaskFailure(FailureKind.PERMANENT_API_ERROR, f"Stripe refused the request: {text}")
    task.push_request(retries=0, id="t-unsendable-text")
    try:
        with pytest.raises(TaskFailure):
            handle_failure(task, refused, account, {"account_id": account})
    finally:
        task.pop_request()
    state, error_class, error = stuck_error(engine, account)
    assert (state, error_class) == ("dead", "permanent_api_error")
    assert error.startswith("TaskFailure: Stripe refused the request: a ") and "the answer" in error, error
