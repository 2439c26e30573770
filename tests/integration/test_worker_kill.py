"""A real worker process SIGKILLed in the middle of a payment retry: the message comes back after
the (short) visibility timeout, another worker completes it, and Stripe sees one charge."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import pytest

from app.payments.pay import PAUSE_ENV
from app.payments.retries import claim_due
from tasks.factory import make_celery
from tests.conftest import wait_for
from tests.integration.dunning_setup import failed_invoice, retries
from tests.integration.processes import celery_process, env_for

pytestmark = pytest.mark.worker

VISIBILITY_TIMEOUT = 20


def waiting_on_advisory_lock(engine) -> bool:
    with engine.connect() as conn:
        return bool(conn.exec_driver_sql(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").scalar_one())


def test_a_killed_worker_loses_nothing_and_charges_once(client, accounts, engine, worker, settings, runtime,
                                                        fake_stripe):
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    queue = f"killtest-{uuid.uuid4().hex[:8]}"  # only the subprocess workers consume it
    pause_key = int(uuid.uuid4().int % 2**62)
    worker_settings = runtime.settings  # points at the fake Stripe
    producer = make_celery(worker_settings.with_overrides(visibility_timeout=VISIBILITY_TIMEOUT))
    args = ["worker", "-Q", queue, "--pool", "solo", "-E", "--without-mingle", "--without-gossip", "-l", "info"]

    with engine.connect() as holder:
        holder.exec_driver_sql("SELECT pg_advisory_lock(%(k)s)", {"k": pause_key})
        holder.commit()
        env = env_for(worker_settings, VISIBILITY_TIMEOUT, **{PAUSE_ENV: str(pause_key)})
        with celery_process([*args, "-n", f"a-{queue}@%h"], env) as first:
            producer.send_task("tasks.retry_payment", [retry_id], queue=queue)
            # The worker claimed the row and now waits on the test's lock, before calling Stripe.
            wait_for(lambda: retries(engine, account)[0]["state"] == "charging", timeout=60, message="charging")
            wait_for(lambda: waiting_on_advisory_lock(engine), timeout=30, message="worker paused")
            first.kill()  # SIGKILL: no ack, no cleanup
            first.wait()
            killed_at = time.monotonic()
        holder.exec_driver_sql("SELECT pg_advisory_unlock(%(k)s)", {"k": pause_key})
        holder.commit()
    assert fake_stripe.pay_requests() == []  # it died before charging

    with celery_process([*args, "-n", f"b-{queue}@%h"], env_for(worker_settings, VISIBILITY_TIMEOUT)):
        wait_for(lambda: retries(engine, account)[0]["state"] == "sent", timeout=150,
                 message="the killed task delivered again and completed")
    redelivered_after = time.monotonic() - killed_at
    assert redelivered_after < 120  # the short visibility timeout, not the broker's default hour

    (row,) = retries(engine, account)
    (request,) = fake_stripe.pay_requests(invoice)
    assert request.idempotency_key == row["idempotency_key"]
    assert fake_stripe.charges == [(invoice, row["idempotency_key"])]
