"""GET /support/tasks/<id> for a support recompute whose result is no longer kept, or that was never queued.

Celery answers PENDING for a task id it has no result for: a task still queued, and as well one that
ran longer ago than results are kept (result_expires, 24 h), or one the broker never took. The route
knows the task from its audit row (who asked, when, whether it was queued) and says which it is.
The row's age is the database's: it wrote ``at``, and a web host's clock (or a test's frozen one)
says nothing about it. So these tests age the row, not the host's clock.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from celery.result import AsyncResult
from flask.testing import FlaskClient
from freezegun import freeze_time
from sqlalchemy import Engine

from tests.conftest import SUPPORT_ACTOR, SUPPORT_TOKEN, Accounts, wait_for
from tests.integration.test_support import failed_invoice_mirrored

SUPPORT = {"Authorization": f"Bearer {SUPPORT_TOKEN}"}
RETENTION = timedelta(hours=24)  # tasks/factory.py: result_expires


def status_of(client: FlaskClient, task_id: str) -> dict[str, Any]:
    response = client.get(f"/support/tasks/{task_id}", headers=SUPPORT)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json is not None
    return response.json


def requested_ago(engine: Engine, task_id: str, ago: timedelta) -> datetime:
    """The task's audit row, as if written ``ago`` by the database's clock; its new ``at``."""
    with engine.begin() as conn:
        return conn.exec_driver_sql("UPDATE audit_log SET at = now() - %(ago)s WHERE detail->>'task_id' = %(t)s "
                                    "RETURNING at", {"ago": ago, "t": task_id}).scalar_one()


def audited_request(engine: Engine, account: str, **detail: Any) -> str:
    """A support recompute's audit row, as the button writes it (app/support/views.py _recompute),
    for a task that no worker has run (still queued, as far as the result backend can tell)."""
    from app.support import audit

    task_id = str(uuid.uuid4())
    with engine.begin() as conn:
        audit.record(conn, SUPPORT_ACTOR, "recompute", account,
                     {"task_id": task_id, "trigger": "NINJAPANEL_BUTTON", **detail})
    return task_id


def test_celery_keeps_results_for_the_retention_the_route_reads(celery_app: Celery):
    assert celery_app.conf.result_expires == RETENTION.total_seconds()


@pytest.mark.worker
def test_a_task_whose_result_expired_is_expired_not_pending(client: FlaskClient, engine: Engine, accounts: Accounts,
                                                            celery_app: Celery, worker):
    account, customer = accounts.create()
    failed_invoice_mirrored(engine, customer)
    response = client.post(f"/support/accounts/{account}/recompute", headers=SUPPORT)
    assert response.status_code == 202 and response.json is not None
    task_id = response.json["task_id"]
    wait_for(lambda: status_of(client, task_id)["done"], message="support recompute task")

    # A day later, the result still there (a backend that keeps it longer): shown as it is.
    requested_ago(engine, task_id, RETENTION + timedelta(minutes=1))
    assert status_of(client, task_id)["state"] == "SUCCESS"

    AsyncResult(task_id, app=celery_app).forget()  # what the result's expiry does in the backend
    requested_ago(engine, task_id, RETENTION - timedelta(minutes=1))
    # Within the retention, no result means not run yet.
    assert (status_of(client, task_id)["state"], status_of(client, task_id)["done"]) == ("PENDING", False)
    asked = requested_ago(engine, task_id, RETENTION + timedelta(minutes=1))
    status = status_of(client, task_id)
    assert status["state"] == "EXPIRED" and status["done"] is True, status
    assert status["account_id"] == account and status["task_id"] == task_id
    assert "more than 24 h ago" in status["reason"] and "no longer kept" in status["reason"]
    assert datetime.fromisoformat(status["requested_at"]) == asked


def test_a_task_requested_longer_ago_than_results_are_kept_is_expired(client: FlaskClient, engine: Engine,
                                                                      accounts: Accounts):
    account, _ = accounts.create()
    task_id = audited_request(engine, account)
    assert status_of(client, task_id)["state"] == "PENDING"
    requested_ago(engine, task_id, RETENTION - timedelta(seconds=1))
    assert status_of(client, task_id)["state"] == "PENDING"
    requested_ago(engine, task_id, RETENTION + timedelta(seconds=1))
    assert status_of(client, task_id)["state"] == "EXPIRED"
    requested_ago(engine, task_id, timedelta(days=400))
    assert status_of(client, task_id)["state"] == "EXPIRED"


def test_a_host_clock_far_from_the_databases_decides_nothing(client: FlaskClient, engine: Engine,
                                                           accounts: Accounts):
    """A task just requested, polled on a web host whose clock is days ahead of the database's (or
    under a test's frozen clock, as the journey tests poll): still PENDING, not EXPIRED at once."""
    account, _ = accounts.create()
    task_id = audited_request(engine, account)
    with freeze_time(datetime.now(UTC) + timedelta(days=3)):
        assert status_of(client, task_id)["state"] == "PENDING"


def test_a_task_the_broker_refused_is_not_queued_not_pending(client: FlaskClient, engine: Engine, accounts: Accounts):
    """The button answered 503 and audited queued: false; a poll of its id (a page reloaded with it,
    a script) waited for a task that will never run."""
    account, _ = accounts.create()
    task_id = audited_request(engine, account, queued=False)
    status = status_of(client, task_id)
    assert (status["state"], status["done"], status["account_id"]) == ("NOT_QUEUED", True, account)
    assert "never ran" in status["reason"]
