"""Flower shows a retrying task with its retry count and exception: a real worker (-E), a real
Flower process, and retry_payment against a fake Stripe answering 429 with Retry-After."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import requests

from app.payments.retries import claim_due
from tasks.factory import make_celery
from tests.conftest import wait_for
from tests.fakes import fake_stripe as outcomes
from tests.integration.dunning_setup import failed_invoice, retries
from tests.integration.processes import answers, celery_process, env_for, free_port

pytestmark = pytest.mark.worker


def flower_task(base: str, task_id: str) -> dict[str, Any] | None:
    try:
        response = requests.get(f"{base}/api/task/info/{task_id}", timeout=2)
    except requests.RequestException:
        return None
    return response.json() if response.status_code == 200 else None


def queue_lengths(base: str, queue: str) -> dict[str, Any] | None:
    """Flower's /api/queues/length once it lists ``queue``. Flower learns a worker's queues by
    inspecting the workers, which it does at start and on a refresh: asked for one first, so a
    worker that came up after Flower's own inspect is known."""
    try:
        requests.get(f"{base}/api/workers", params={"refresh": "1"}, timeout=30)
        response = requests.get(f"{base}/api/queues/length", timeout=10)
    except requests.RequestException:
        return None
    assert response.status_code == 200, response.text  # 404 "'redis' broker is not supported" before
    answer: dict[str, Any] = response.json()
    return answer if queue in {q["name"] for q in answer["active_queues"]} else None


def test_flower_shows_a_retrying_task_with_retries_and_exception(client, accounts, engine, worker, runtime,
                                                                 fake_stripe):
    account, customer = accounts.create()
    failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    fake_stripe.script(*[outcomes.rate_limit(retry_after=2)] * 4)  # then success

    queue = f"flowertest-{uuid.uuid4().hex[:8]}"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = env_for(runtime.settings)
    worker_args = ["worker", "-Q", queue, "--pool", "solo", "-E", "--without-mingle", "-l", "info",
                   "-n", f"{queue}@%h"]
    flower_env = {**env, "FLOWER_UNAUTHENTICATED_API": "true"}
    with celery_process(["flower", "--address=127.0.0.1", f"--port={port}"], flower_env), \
            celery_process(worker_args, env):
        wait_for(lambda: answers(f"{base}/healthcheck"), timeout=60, message="Flower up")
        task_id = f"retry-{retry_id}-{uuid.uuid4().hex[:6]}"
        # Sent as tasks.dispatch_due_retries sends it, without a result (nobody reads one): Flower's
        # states and result come from the task events, not from the result backend.
        make_celery(runtime.settings).send_task("tasks.retry_payment", [retry_id], queue=queue, task_id=task_id,
                                                ignore_result=True)

        # A retry shows as its retried event (with the exception) and then the message sent again
        # (RECEIVED, retries=N): Flower merges both into the task.
        retrying = wait_for(lambda: (t := flower_task(base, task_id)) and (t.get("retries") or 0) >= 1
                            and t.get("exception") and t, timeout=60, message="Flower sees the retry")
        assert retrying["name"] == "tasks.retry_payment"
        assert retrying["state"] in ("RETRY", "RECEIVED", "STARTED", "PENDING")
        assert "rate limit" in retrying["exception"].lower()
        listed = requests.get(f"{base}/api/tasks", params={"taskname": "tasks.retry_payment"},
                              timeout=30).json()  # an answer that must come: far off
        assert listed[task_id]["retries"] >= 1

        # The broker's queue lengths (Flower's Broker page and API): Flower reads the broker's URL
        # scheme to know it is Redis. The worker's queue is listed, with what waits in it.
        lengths = wait_for(lambda: queue_lengths(base, queue), timeout=60, message="Flower reads the queue lengths")
        assert all(q["messages"] >= 0 for q in lengths["active_queues"])

        done = wait_for(lambda: (t := flower_task(base, task_id)) and t.get("state") == "SUCCESS" and t,
                        timeout=90, message="the retried task succeeds")
        assert done["retries"] == 4
        assert done["result"] and "'outcome': 'sent'" in done["result"]
    assert [r["state"] for r in retries(engine, account)] == ["sent"]
    assert len(fake_stripe.charges) == 1

