"""The support page in a browser: what it shows is escaped, and the responses tell the browser not to
frame, sniff, cache or run anything but the page's own script."""

from __future__ import annotations

import uuid

import pytest
from markupsafe import escape
from sqlalchemy.exc import DBAPIError

from tests.conftest import SUPPORT_TOKEN

SUPPORT = {"Authorization": f"Bearer {SUPPORT_TOKEN}"}
MARKUP = '<img src=x onerror="alert(1)">'


def test_markup_in_an_account_id_a_decline_message_or_a_task_error_is_shown_as_text(client, engine, accounts):
    """Account ids come from other teams, failure reasons and errors from Stripe: none is trusted."""
    account, _ = accounts.create(account_id=f"acct_{MARKUP}")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO bad_debt_payment (account_id, idempotency_key, request_fingerprint, amount, failure_reason) "
            "VALUES (%(a)s, 'k-xss', 'f', 100, %(m)s)", {"a": account, "m": f"card_declined: {MARKUP}"})
        conn.exec_driver_sql("INSERT INTO subs_stuck_events (account_id, task_name, error_class, error) "
                             "VALUES (%(a)s, 'tasks.recompute_account', 'permanent', %(m)s)",
                             {"a": account, "m": f"CardError: {MARKUP}"})
    page = client.get(f"/support/accounts/{account}", headers=SUPPORT)
    text = page.get_data(as_text=True)
    assert page.status_code == 200
    assert MARKUP not in text
    assert text.count(str(escape(MARKUP))) >= 3  # the id (title, heading, data attribute), the reason, the error


@pytest.mark.parametrize("path", ["/support/accounts/{account}", "/support/lifting", "/support/login",
                                  "/support/accounts/{account}/state"])
def test_support_responses_may_not_be_framed_cached_or_sniffed(client, accounts, path):
    """A page that authenticates writes by its cookie is kept out of other sites' frames (clickjacking
    the Recompute button), out of caches (it holds account data and the session's CSRF token) and runs
    only its own script (a markup slip is not an XSS)."""
    account, _ = accounts.create()
    response = client.get(path.format(account=account), headers=SUPPORT)
    assert response.status_code == 200
    assert response.headers["X-Frame-Options"] == "DENY"
    policy = response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy and "unsafe-inline'" not in \
        policy.split("script-src", 1)[1].split(";", 1)[0]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "no-store" in response.headers["Cache-Control"]
    assert response.headers["Referrer-Policy"] == "same-origin"


@pytest.mark.parametrize(("method", "path"), [("GET", "/support/nope"), ("GET", "/support/logout"),
                                             ("PUT", "/support/login"), ("DELETE", "/support/accounts/{account}"),
                                             ("GET", "/support"), ("GET", "/support/tasks/")])
def test_support_answers_no_route_matched_carry_the_same_headers(client, accounts, method, path):
    """A 404 or 405 under /support is a /support response too (README: every one carries them),
    although no support view ran."""
    account, _ = accounts.create()
    response = client.open(path.format(account=account), method=method, headers=SUPPORT)
    assert response.status_code in (404, 405) and response.is_json
    assert response.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "no-store" in response.headers["Cache-Control"]
    assert response.headers["Referrer-Policy"] == "same-origin"


def _support_task(engine, account: str) -> str:
    from app.db import unit_of_work
    from app.support import audit

    task_id = str(uuid.uuid4())
    with unit_of_work(engine) as conn:
        audit.record(conn, "ann", "recompute", account, {"task_id": task_id})
    return task_id


def test_a_recompute_that_failed_on_a_database_error_is_reported_without_its_sql(client, engine, accounts,
                                                                                  celery_app):
    """The button's poll shows the task's error to support: psycopg2's message goes on with the
    statement (and its values) from its second line, SQLAlchemy's with [SQL: ...]; neither is theirs
    to read (the worker log and the Stuck work row keep it for engineers)."""
    account, _ = accounts.create()
    task_id = _support_task(engine, account)
    with pytest.raises(DBAPIError) as failed, engine.connect() as conn:
        conn.exec_driver_sql("SELECT no_such_column FROM subs_account WHERE account_id = %(a)s", {"a": "acct_value"})
    celery_app.backend.mark_as_failure(task_id, failed.value)
    body = client.get(f"/support/tasks/{task_id}", headers=SUPPORT).json
    assert body["state"] == "FAILURE" and body["done"] is True
    assert body["error"] == 'ProgrammingError: (psycopg2.errors.UndefinedColumn) column "no_such_column" does not exist'


@pytest.mark.parametrize(("statement", "shown"), [
    ("SELECT %(v)s::int", 'DataError: (psycopg2.errors.InvalidTextRepresentation) invalid input syntax for type '
                          'integer: "..."'),
    ("SELECT 'x' %(v)s", 'ProgrammingError: (psycopg2.errors.SyntaxError) syntax error at or near "..."'),
])
def test_a_recompute_that_failed_on_a_value_postgresql_quotes_is_reported_without_it(client, engine, accounts,
                                                                                     celery_app, statement, shown):
    """A data exception's first line quotes the value refused, a syntax error's the token it stopped
    at (psycopg2 inlines the values): as the Stuck work row (tasks.failures.describe), the poll leaves
    the value out, also one holding a double quote (PostgreSQL does not escape it)."""
    account, _ = accounts.create()
    task_id = _support_task(engine, account)
    value = 'ana" ana.secret@example.com "x'
    with pytest.raises(DBAPIError) as failed, engine.connect() as conn:
        conn.exec_driver_sql(statement, {"v": value})
    celery_app.backend.mark_as_failure(task_id, failed.value)
    body = client.get(f"/support/tasks/{task_id}", headers=SUPPORT).json
    assert body["error"] == shown


def test_a_recompute_that_failed_on_a_plain_error_keeps_its_message(client, engine, accounts, celery_app):
    account, _ = accounts.create()
    task_id = _support_task(engine, account)
    celery_app.backend.mark_as_failure(task_id, LookupError("account has no Stripe customer"))
    body = client.get(f"/support/tasks/{task_id}", headers=SUPPORT).json
    assert body["error"] == "LookupError: account has no Stripe customer"


def test_a_recompute_that_failed_on_a_value_the_hot_path_refused_is_reported_without_it(client, engine, accounts,
                                                                                       celery_app):
    """The hot paths' statements (app/db.py fetch_prepared_row) name a refused value ValueRejected,
    with the driver's message: the poll leaves the value out of it too."""
    from app.db import Prepared, ValueRejected, fetch_prepared_row

    account, _ = accounts.create()
    task_id = _support_task(engine, account)
    value = 'ana" ana.secret@example.com "x'
    with pytest.raises(ValueRejected) as refused, engine.connect() as conn:
        fetch_prepared_row(conn, (Prepared("test_value_as_int", "SELECT $1::int"), (value,)))
    celery_app.backend.mark_as_failure(task_id, refused.value)
    body = client.get(f"/support/tasks/{task_id}", headers=SUPPORT).json
    assert "secret" not in body["error"] and "ana" not in body["error"]
    assert body["error"] == 'ValueRejected: invalid input syntax for type integer: "..."'
