"""Bad input anywhere gets a 4xx with a reason, never a 500."""

from __future__ import annotations

import pytest
from flask import Flask
from sqlalchemy import Engine

from app import errors
from app.db import unit_of_work
from tests.conftest import SUPPORT_TOKEN, post_event, service_headers
from tests.stripe_events import event

SUPPORT = {"Authorization": f"Bearer {SUPPORT_TOKEN}"}


@pytest.mark.parametrize(("method", "path", "headers", "body"), [
    ("GET", "/accounts/%00/dunning", "service", None),
    ("GET", "/accounts/a%00b/billing-history", "service", None),
    ("GET", "/ops/stuck-events?account_id=%00", "service", None),
    ("POST", "/pay-bad-debt", "service", {"account_id": "\u0000", "amount": 100}),
    ("POST", "/support/accounts/%00/recompute", "support", None),
    ("GET", "/support/accounts/%00/state", "support", None),
    ("GET", "/support/account?id=%00", "support", None),
    ("GET", "/support/account/state?id=a%00b", "support", None),
    ("POST", "/support/account/recompute?id=%00", "support", None),
])
def test_a_nul_character_is_a_400_with_a_reason(client, method, path, headers, body):
    h = dict(service_headers() if headers == "service" else SUPPORT)
    if path == "/pay-bad-debt":
        h["Idempotency-Key"] = "key-1"
    response = client.open(path, method=method, headers=h, json=body)
    assert response.status_code == 400, (response.status_code, response.get_data(as_text=True))
    assert "NUL" in response.json["reason"]


@pytest.mark.parametrize("path", ["/ops/stuck-events", "/ops/outbox", "/ops/lifting"])
@pytest.mark.parametrize("limit", ["\u00b2", "9" * 5000, "-1", "0", "1.5", "abc"])
def test_a_limit_that_is_not_a_whole_number_in_range_is_a_400(client, path, limit):
    response = client.get(path, query_string={"limit": limit}, headers=service_headers())
    assert response.status_code == 400, (response.status_code, response.get_data(as_text=True))
    assert "limit" in response.json["reason"]


def _pay(client, data: str):
    headers = {**service_headers(), "Idempotency-Key": "key-1"}
    return client.post("/pay-bad-debt", data=data, headers=headers, content_type="application/json")


def test_a_body_nested_too_deeply_is_a_400_with_a_reason(client, clean):
    # json.loads raises RecursionError, which get_json(silent=True) does not catch: it was a 500.
    response = _pay(client, "[" * 100_000 + "]" * 100_000)
    assert response.status_code == 400, (response.status_code, response.get_data(as_text=True))
    assert "nested too deeply" in response.json["reason"]


@pytest.mark.parametrize("account", ["\\ud800", "acct\\udc80x"])
def test_a_lone_surrogate_is_a_400_with_a_reason(client, clean, account):
    # JSON may escape half a surrogate pair alone; psycopg2's UTF-8 encoding raised UnicodeEncodeError,
    # a ValueError that reached the NUL handler and then the 500 of an unexpected error.
    response = _pay(client, '{"account_id": "' + account + '", "amount": 100}')
    assert response.status_code == 400, (response.status_code, response.get_data(as_text=True))
    assert "not valid Unicode text" in response.json["reason"]


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", "/pay-bad-debt", {"POST"}),
    ("GET", "/webhooks/stripe", {"POST"}),
    ("GET", "/support/logout", {"POST"}),
    ("DELETE", "/ops/rollout", {"GET", "HEAD", "POST"}),
])
def test_a_method_the_path_does_not_take_is_a_405_that_says_which_it_takes(client, method, path, allowed):
    # The JSON error handler rebuilt the response and lost the Allow header (RFC 9110 15.5.6: MUST).
    response = client.open(path, method=method, headers=service_headers())
    assert response.status_code == 405 and response.json["error"] == "method_not_allowed"
    assert response.content_type == "application/json"
    assert allowed <= {m.strip() for m in response.headers["Allow"].split(",")}


@pytest.mark.parametrize(("statement", "value", "reason"), [
    ("SELECT %(v)s::jsonb", '["a\\u0000"]', "Unicode escape"),
    ("SELECT %(v)s::integer", str(2**40), "out of range"),
    ("SELECT %(v)s::timestamptz", "2026-02-30", "out of range"),
])
def test_a_value_postgresql_refuses_as_data_is_a_422_with_the_reason(engine: Engine, statement, value, reason):
    # SQLSTATE class 22 (psycopg2.DataError) went to the DBAPIError handler's 500 "database error".
    # Every endpoint's views check what they know; this is the handler behind them, on a real refusal.
    app = Flask(__name__)
    errors.register(app)

    @app.post("/store")
    def store() -> str:
        with unit_of_work(engine) as conn:
            conn.exec_driver_sql(statement, {"v": value})
        return "stored"

    response = app.test_client().post("/store")
    assert response.status_code == 422, (response.status_code, response.get_data(as_text=True))
    assert response.json is not None
    assert response.json["error"] == "unprocessable" and reason in response.json["reason"]
    assert "SELECT" not in response.json["reason"]


@pytest.mark.parametrize("event_type", ["invoice.payment_failed", "invoice.paid", "customer.subscription.updated"])
def test_a_signed_event_whose_object_has_no_customer_is_kept_unroutable_not_refused(client, engine, clean,
                                                                                    event_type):
    # Stripe's invoice and subscription carry customer_account beside customer (the fixtures have
    # both): one billed to an account has no customer. Its mirror row broke stripe_customer_id's NOT
    # NULL: a 422 "holds a value that cannot be stored" on every delivery, and the event was never kept.
    evt = event(event_type, customer=None)
    response = post_event(client, evt)
    assert response.status_code == 200, (response.status_code, response.get_data(as_text=True))
    assert response.json["state"] == "unroutable"
    with engine.connect() as conn:
        state = conn.exec_driver_sql("SELECT state FROM stripe_event WHERE id = %(i)s", {"i": evt["id"]}).scalar()
    assert state == "unroutable"  # kept and visible in the inbox


def test_a_signed_event_holding_a_value_no_column_takes_is_a_422_that_names_it(client, engine, clean):
    # The reason was "holds a value that cannot be stored", the same for every value: neither Stripe's
    # endpoint log nor ours said which one (PostgreSQL's first line does; its DETAIL, the row, is left out).
    evt = event("invoice.payment_failed", amount_due=2**63)
    response = post_event(client, evt)
    assert response.status_code == 422, (response.status_code, response.get_data(as_text=True))
    assert "9223372036854775808" in response.json["reason"] and "out of range" in response.json["reason"]
    assert "DETAIL" not in response.json["reason"]
