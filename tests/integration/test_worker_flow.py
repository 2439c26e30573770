"""End to end: signed webhook -> Flask -> real broker -> real Celery worker -> database."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.conftest import Accounts, post_event, service_headers, wait_for
from tests.stripe_events import event, unique

pytestmark = pytest.mark.worker


def dunning(client: Any, account: str) -> dict[str, Any]:
    response = client.get(f"/accounts/{account}/dunning", headers=service_headers())
    assert response.status_code == 200, response.json
    return dict(response.json)


def test_failed_then_paid_invoice_moves_the_account_through_dunning(client, accounts: Accounts, worker):
    account, customer = accounts.create()
    invoice = unique("in")
    now = int(time.time())
    response = post_event(client, event("invoice.payment_failed", id=invoice, customer=customer, created=now))
    assert response.status_code == 200
    state = wait_for(lambda: (s := dunning(client, account))["status"] == "past_due" and s, message="past_due")
    assert state["level"] == "notice"
    assert state["version"] == 1
    assert state["failure_class"] == "unknown"  # detail of the attempt has not arrived yet
    assert any(r["rule"] == "level.notice" for r in state["reasons"])
    for key in ("account_id", "status", "level", "failure_class", "next_retry_at", "retries_used", "bad_debt",
                "reasons", "entitlements", "version"):
        assert key in state

    post_event(client, event("invoice.paid", id=invoice, customer=customer, created=now + 5))
    state = wait_for(lambda: (s := dunning(client, account))["status"] == "current" and s, message="current")
    assert state["level"] == "none" and state["next_retry_at"] is None and state["version"] == 2


def test_broker_down_at_ingest_is_redriven_when_it_returns(settings, runtime, celery_app, accounts, engine: Engine,
                                                           worker, client):
    from app import create_app
    from app.redrive import redrive
    from tasks.factory import make_celery

    account, customer = accounts.create()
    dead_broker = make_celery(settings.with_overrides(broker_url="redis://127.0.0.1:1/0"))
    app = create_app(settings, runtime=runtime, celery=dead_broker)
    response = post_event(app.test_client(), event("invoice.payment_failed", customer=customer))
    assert response.status_code == 200  # accepted: stored and committed before the enqueue
    assert response.json["state"] == "enqueue_failed"
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM recompute_request").scalar_one() == 1
        assert conn.exec_driver_sql("SELECT state FROM stripe_event").scalar_one() == "enqueue_failed"
    assert dunning(client, account)["status"] == "current"  # nothing ran yet

    # The broker is back (the app's own one): beat's re-drive queues what was accepted.
    assert redrive(engine, celery_app, stale_after_seconds=0)["sent"] == 1
    wait_for(lambda: dunning(client, account)["status"] == "past_due", message="re-driven recompute")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT state FROM stripe_event").scalar_one() == "accepted"
        assert conn.exec_driver_sql("SELECT count(*) FROM recompute_request").scalar_one() == 0


def test_a_redrive_whose_broker_fails_half_way_marks_accepted_only_what_it_queued(
        settings, runtime, celery_app, accounts, engine: Engine, monkeypatch, client):
    """Two accepted events whose recompute was never queued; the re-drive queues one and the broker
    goes away before the other (a chunk each here). Only the queued one's event becomes accepted:
    the other stays enqueue_failed, visible as waiting for its recompute, until a re-drive queues it."""
    from app import create_app
    from app import redrive as redrive_module
    from app.dispatch import BrokerUnavailable
    from tasks.factory import make_celery

    dead_broker = make_celery(settings.with_overrides(broker_url="redis://127.0.0.1:1/0"))
    app = create_app(settings, runtime=runtime, celery=dead_broker)
    events = {}
    for _ in range(2):
        account, customer = accounts.create()
        events[account] = event("invoice.payment_failed", customer=customer)
        assert post_event(app.test_client(), events[account]).json["state"] == "enqueue_failed"

    queued: list[str] = []
    send_many = redrive_module.send_many

    def broker_gone_after_one(app_: Any, calls: Any) -> None:
        if queued:
            raise BrokerUnavailable("broker did not accept tasks.recompute_account: ConnectionError")
        send_many(app_, calls)
        queued.extend(call.args[0] for call in calls)

    monkeypatch.setattr(redrive_module, "SEND_CHUNK", 1)
    monkeypatch.setattr(redrive_module, "send_many", broker_gone_after_one)
    report = redrive_module.redrive(engine, celery_app, stale_after_seconds=0)
    assert (report["sent"], report["failed"]) == (1, 1)
    (sent,) = queued
    with engine.connect() as conn:
        states = {a: conn.exec_driver_sql("SELECT state FROM stripe_event WHERE id = %(i)s",
                                          {"i": e["id"]}).scalar_one() for a, e in events.items()}
    assert states == {a: "accepted" if a == sent else "enqueue_failed" for a in events}


def test_dunning_endpoint_requires_a_service_token(client, accounts):
    account, _ = accounts.create()
    assert client.get(f"/accounts/{account}/dunning").status_code == 401
    assert client.get(f"/accounts/{account}/dunning", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get(f"/accounts/{account}/billing-history").status_code == 401
    assert client.get("/accounts/nobody/dunning", headers=service_headers()).status_code == 404
    fresh = dunning(client, account)
    assert fresh["status"] == "current" and fresh["version"] == 0 and fresh["bad_debt"] is False


def test_health_and_readiness(client, clean):
    assert client.get("/healthz").json == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json["checks"] == {"database": "ok", "broker": "ok"}
