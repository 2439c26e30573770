"""Real worker processes SIGKILLed at a known point of a task: the message comes back after the
visibility timeout, another worker completes it, and nothing is done twice.

The timeout is the shortest Settings accepts (185 s). Rather than wait it out, the test moves the
broker's clock as freezegun moves ours: it ages the killed delivery's entry in Redis' unacked index
by the timeout, and kombu's own restore sweep (every 10 s) gives the message back.

The worker is frozen at that point by what is around it, never by a hook in product code: in a payment
retry, the fake Stripe holds its answer to the charge; in a recompute, the test holds the account's
advisory lock on a connection of its own, so the recompute's transaction waits on it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, cast

import pytest
import redis
from sqlalchemy import Engine

from app import create_app
from app.config import MIN_VISIBILITY_TIMEOUT, Settings
from app.payments.retries import claim_due
from tasks.factory import make_celery
from tests.conftest import post_event, wait_for
from tests.fakes import fake_stripe as stripe_outcomes
from tests.integration.dunning_setup import dunning_row, failed_invoice, retries
from tests.integration.processes import celery_process, env_for
from tests.stripe_events import event

pytestmark = pytest.mark.worker

# The shortest timeout Settings accepts (shorter, Redis would hand a task in its countdown or still
# running to a second worker).
VISIBILITY_TIMEOUT = MIN_VISIBILITY_TIMEOUT
REDELIVERY_DEADLINE = 60  # kombu's restore sweep runs every 10 s (unacked_restore_interval)

# The per-account lock of app/recompute/service.py (same key), taken session-level by the test: the
# recompute's transaction-level pg_advisory_xact_lock on it then waits.
HOLD_ACCOUNT_SQL = "SELECT pg_advisory_lock(hashtextextended(%(account)s, 7281))"
RELEASE_ACCOUNT_SQL = "SELECT pg_advisory_unlock(hashtextextended(%(account)s, 7281))"

# Backends of this database waiting for the advisory lock that backend %(holder)s holds.
WAITERS_SQL = """
SELECT w.pid, a.query
  FROM pg_locks h
  JOIN pg_locks w USING (locktype, database, classid, objid, objsubid)
  JOIN pg_stat_activity a ON a.pid = w.pid
 WHERE h.locktype = 'advisory' AND h.granted AND h.pid = %(holder)s AND NOT w.granted
"""


def let_the_visibility_timeout_pass(settings: Settings) -> int:
    """Age every unacknowledged delivery in Redis by the visibility timeout, as if that long had gone
    by since it was handed out: how many. (kombu keeps each delivery's time as its score in the
    ``unacked_index`` sorted set; its restore sweep gives back those older than the timeout.)"""
    client = redis.Redis.from_url(settings.broker_url)
    try:
        key = f"{settings.broker_key_prefix}unacked_index"
        # redis-py types a synchronous client's answers as ResponseT: with scores, (member, score) pairs
        entries = cast(list[tuple[bytes, float]], client.zrange(key, 0, -1, withscores=True))
        if entries:
            client.zadd(key, {member: score - VISIBILITY_TIMEOUT for member, score in entries})
        return len(entries)
    finally:
        client.close()


def worker_args(queue: str, name: str) -> list[str]:
    """A worker consuming only ``queue``: the session worker of the other tests never sees the task."""
    return ["worker", "-Q", queue, "--pool", "solo", "-E", "--without-mingle", "--without-gossip", "-l", "info",
            "-n", f"{name}-{queue}@%h"]


def waiters(engine: Engine, holder_pid: int) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        return [(r[0], r[1]) for r in conn.exec_driver_sql(WAITERS_SQL, {"holder": holder_pid})]


def backend_alive(engine: Engine, pid: int) -> bool:
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT 1 FROM pg_stat_activity WHERE pid = %(p)s", {"p": pid}).first() is not None


def outbox(engine: Engine, account: str) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        return [(r[0], r[1]) for r in conn.exec_driver_sql(
            "SELECT dunning_version, event_type FROM outbox WHERE account_id = %(a)s ORDER BY id", {"a": account})]


def pending_request(engine: Engine, account: str) -> Any:
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT trigger FROM recompute_request WHERE account_id = %(a)s",
                                    {"a": account}).scalar()


def test_a_worker_killed_inside_the_stripe_call_is_replaced_and_stripe_charges_once(
        client, accounts, engine, worker, runtime, fake_stripe):
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    queue = f"killtest-{uuid.uuid4().hex[:8]}"
    env = env_for(runtime.settings, VISIBILITY_TIMEOUT)  # runtime.settings points at the fake Stripe
    producer = make_celery(runtime.settings)
    fake_stripe.script(stripe_outcomes.hold())

    with celery_process(worker_args(queue, "a"), env) as first:
        producer.send_task("tasks.retry_payment", [retry_id], queue=queue)
        # The fake records the request on arrival and holds its answer: the worker is inside invoices.pay.
        (held,) = wait_for(lambda: fake_stripe.pay_requests(invoice), timeout=60, message="worker inside Stripe")
        assert retries(engine, account)[0]["state"] == "charging"
        first.kill()  # SIGKILL: no ack, no cleanup
        first.wait()
    # Stripe goes on and charges although the caller is gone; its answer is kept for the key.
    fake_stripe.release()
    wait_for(lambda: fake_stripe.charges, message="the held charge ran")
    assert retries(engine, account)[0]["state"] == "charging"  # nobody learnt the outcome

    assert let_the_visibility_timeout_pass(runtime.settings) >= 1  # the killed worker's delivery
    with celery_process(worker_args(queue, "b"), env):
        wait_for(lambda: retries(engine, account)[0]["state"] == "sent", timeout=REDELIVERY_DEADLINE,
                 message="the killed task delivered again and completed")

    (row,) = retries(engine, account)
    assert (row["id"], row["retry_number"], row["error"]) == (retry_id, 1, None)
    first_request, again = fake_stripe.pay_requests(invoice)
    assert first_request is held
    # Charged again with the same key: Stripe replays the first answer instead of charging twice.
    assert first_request.idempotency_key == again.idempotency_key == row["idempotency_key"]
    assert (first_request.replayed, again.replayed) == (False, True)
    assert fake_stripe.charges == [(invoice, row["idempotency_key"])]


def test_a_worker_killed_inside_a_recompute_is_replaced_and_the_account_ends_right(accounts, engine, runtime,
                                                                                    settings):
    account, customer = accounts.create()
    queue = f"killtest-{uuid.uuid4().hex[:8]}"
    env = env_for(settings, VISIBILITY_TIMEOUT)
    # The real webhook endpoint, with its recompute routed to the test's own workers.
    producer = make_celery(settings)
    producer.conf.task_routes = {"tasks.recompute_account": {"queue": queue}}
    webhooks = create_app(settings, runtime=runtime, celery=producer)
    webhooks.config["TESTING"] = True

    with engine.connect() as holder:
        holder_pid = holder.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        holder.exec_driver_sql(HOLD_ACCOUNT_SQL, {"account": account})
        holder.commit()
        response = post_event(webhooks.test_client(), event("invoice.payment_failed", customer=customer))
        assert response.status_code == 200 and response.get_json()["enqueued"] is True
        with celery_process(worker_args(queue, "a"), env) as first:
            # Kill inside the recompute's lock wait, well before its lock_timeout (5 s) would end it.
            ((waiter, query),) = wait_for(lambda: waiters(engine, holder_pid), timeout=60, interval=0.02,
                                          message="the recompute waiting on the account lock")
            first.kill()
            first.wait()
        assert "pg_advisory_xact_lock" in query
        # The dead worker's backend still waits: the kill came in the middle of the recompute.
        assert waiters(engine, holder_pid) == [(waiter, query)]
        assert holder.exec_driver_sql(RELEASE_ACCOUNT_SQL, {"account": account}).scalar_one() is True
        holder.commit()

    # That backend gets the lock, finds its client gone and rolls back: nothing of the killed run stays.
    wait_for(lambda: not backend_alive(engine, waiter), message="the killed worker's backend gone")
    assert dunning_row(engine, account).get("version", 0) == 0 and outbox(engine, account) == []
    assert pending_request(engine, account) == "PAYMENT_FAILED"

    assert let_the_visibility_timeout_pass(settings) >= 1
    with celery_process(worker_args(queue, "b"), env):
        wait_for(lambda: dunning_row(engine, account).get("status") == "past_due",
                 timeout=REDELIVERY_DEADLINE, message="the killed recompute delivered again and completed")

    state = dunning_row(engine, account)
    assert (state["status"], state["version"]) == ("past_due", 1)
    assert outbox(engine, account) == [(1, "DunningEntered"), (1, "ConsequenceEscalated"), (1, "EntitlementsChanged")]
    assert pending_request(engine, account) is None
