"""The web app at its edges: a broker it cannot address, a result store that is down, a row lock
held past lock_timeout. Each answer is the documented one (a 200 that says the recompute was not
queued, a 503 with Retry-After), never a 500 that says nothing was accepted when something was."""

from __future__ import annotations

from typing import Any

from flask import Flask
from sqlalchemy import Engine

from app.config import Settings
from app.runtime import Runtime
from tests.conftest import SUPPORT_TOKEN, Accounts, post_event
from tests.stripe_events import event

SUPPORT = {"Authorization": f"Bearer {SUPPORT_TOKEN}"}
# Settings refuses this one at start; the app is built around Settings here (with_overrides), as
# with any broker URL redis-py cannot read for a reason Settings does not check.
UNREADABLE_BROKER = "redis://127.0.0.1:abc/0"


def app_with_broker(settings: Settings, runtime: Runtime, broker_url: str) -> Flask:
    from app import create_app
    from tasks.factory import make_celery

    return create_app(settings, runtime=runtime, celery=make_celery(settings.with_overrides(broker_url=broker_url)))


def stored_state(engine: Engine, event_id: str) -> Any:
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT state FROM stripe_event WHERE id = %(i)s", {"i": event_id}).scalar()


def test_a_webhook_whose_recompute_cannot_reach_an_unreadable_broker_is_stored_and_left_for_beat(
        settings, runtime, engine, accounts: Accounts):
    """The lane for the broker was built outside send_many's try: redis-py's ValueError became a 500
    "nothing was accepted" for an event that was committed. Now it is a broker that did not take the
    message: 200, enqueue_failed, and beat re-drives the request."""
    app = app_with_broker(settings, runtime, UNREADABLE_BROKER)
    _account, customer = accounts.create()
    evt = event("invoice.payment_failed", customer=customer)
    response = post_event(app.test_client(), evt)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json["state"] == "enqueue_failed" and not response.json["enqueued"]
    assert stored_state(engine, evt["id"]) == "enqueue_failed"


def test_the_support_button_with_an_unreadable_broker_is_a_503_and_its_audit_says_not_queued(
        settings, runtime, accounts: Accounts):
    app = app_with_broker(settings, runtime, UNREADABLE_BROKER)
    account, _customer = accounts.create()
    response = app.test_client().post(f"/support/accounts/{account}/recompute", headers=SUPPORT)
    assert response.status_code == 503, (response.status_code, response.get_data(as_text=True))
    assert response.headers["Retry-After"] and "nothing was queued" in response.json["reason"]


def test_a_support_task_polled_while_the_result_store_is_down_is_a_503_with_retry_after(
        settings, runtime, engine, accounts: Accounts):
    """The button answers 503 when Redis is down; the status the page polls right after it let
    redis-py's ConnectionError through to the 500 handler."""
    import uuid

    from app.db import unit_of_work
    from app.support import audit

    account, _customer = accounts.create()
    task_id = str(uuid.uuid4())
    with unit_of_work(engine) as conn:  # a task support started
        audit.record(conn, "alice", "recompute", account, {"task_id": task_id})
    app = app_with_broker(settings, runtime, "redis://127.0.0.1:1/0")  # the result backend is the broker's Redis
    response = app.test_client().get(f"/support/tasks/{task_id}", headers=SUPPORT)
    assert response.status_code == 503, (response.status_code, response.get_data(as_text=True))
    assert response.headers["Retry-After"] and response.json["reason"] == (
        "the task result store is unreachable; retry later")
