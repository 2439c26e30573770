"""A task whose pool child dies under it (out of memory, a crash) is sent again a few times, then
becomes dead stuck work: a message that kills every child that runs it does not come back for ever,
unseen. The child is killed from outside at a known point: inside a recompute waiting for the
account's lock, which the test holds (as tests/integration/test_worker_kill.py does)."""

from __future__ import annotations

import signal
import uuid
from typing import Any

import psutil
import pytest
import redis

from app import create_app
from tasks.factory import LOST_WORKER_RETRIES, make_celery
from tests.conftest import post_event, wait_for
from tests.integration.processes import celery_process, env_for
from tests.integration.test_worker_kill import HOLD_ACCOUNT_SQL, RELEASE_ACCOUNT_SQL, waiters
from tests.stripe_events import event

pytestmark = pytest.mark.worker


def stuck(engine, account: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.exec_driver_sql(
            "SELECT task_name, task_args, error_class, error, attempts, state FROM subs_stuck_events "
            "WHERE account_id = %(a)s", {"a": account}).mappings()]


def test_a_task_that_kills_every_child_that_runs_it_becomes_dead_stuck_work(accounts, engine, runtime, settings):
    account, customer = accounts.create()
    queue = f"losttest-{uuid.uuid4().hex[:8]}"
    producer = make_celery(settings)
    producer.conf.task_routes = {"tasks.recompute_account": {"queue": queue}}
    webhooks = create_app(settings, runtime=runtime, celery=producer)
    webhooks.config["TESTING"] = True
    args = ["worker", "-Q", queue, "--pool", "prefork", "-c", "1", "-E", "--without-mingle", "--without-gossip",
            "-l", "info", "-n", f"lost-{queue}@%h"]
    killed: list[int] = []
    seen: set[int] = set()  # backends seen waiting (a killed child's keeps waiting until lock_timeout)

    def new_waiter() -> set[int]:
        return {pid for pid, _query in waiters(engine, holder_pid)} - seen

    with engine.connect() as holder:
        holder_pid = holder.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        holder.exec_driver_sql(HOLD_ACCOUNT_SQL, {"account": account})
        holder.commit()
        assert post_event(webhooks.test_client(), event("invoice.payment_failed", customer=customer)).json["enqueued"]
        try:
            with celery_process(args, env_for(settings)) as worker:
                main = psutil.Process(worker.pid)
                while not stuck(engine, account):
                    # Each run waits for the lock (the backends of killed children keep waiting too).
                    fresh = wait_for(lambda: new_waiter() or stuck(engine, account), timeout=60, interval=0.02,
                                     message="the recompute waiting on the account lock, or given up")
                    if not isinstance(fresh, set):
                        break
                    seen.update(fresh)
                    (child,) = wait_for(main.children, message="the pool child")
                    child.send_signal(signal.SIGKILL)
                    killed.append(child.pid)
                    def gone(pid: int = child.pid) -> bool:
                        # Reaped between the two looks: gone too (the race failed this under CI's load).
                        try:
                            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                        except psutil.NoSuchProcess:
                            return True

                    wait_for(gone, message="the child gone")
                    assert len(killed) <= LOST_WORKER_RETRIES + 1, "sent again more often than its retries allow"
                [row] = stuck(engine, account)
                broker = redis.Redis.from_url(settings.broker_url)
                assert broker.llen(settings.broker_key_prefix + queue) == 0  # not requeued
        finally:
            holder.exec_driver_sql(RELEASE_ACCOUNT_SQL, {"account": account})
            holder.commit()

    assert len(killed) == LOST_WORKER_RETRIES + 1  # the first run and each retry, every one killed
    assert (row["task_name"], row["state"], row["error_class"]) == ("tasks.recompute_account", "dead", "killed")
    assert row["task_args"]["account_id"] == account and row["task_args"]["trigger"] == "PAYMENT_FAILED"
    assert row["attempts"] == LOST_WORKER_RETRIES + 1 and "WorkerLostError" in row["error"]


def test_a_task_killed_at_its_hard_time_limit_becomes_dead_stuck_work(celery_app, engine, accounts):
    """Celery fails a task its hard time limit killed (the task_failure signal, in the worker's main
    process): recorded like a lost child's, with its positional arguments named for a re-drive."""
    from billiard.exceptions import TimeLimitExceeded
    from celery.signals import task_failure

    import tasks.killed  # connects the handlers, as a worker's start does
    import tasks.recompute  # noqa: F401  (registers the task)

    account, _ = accounts.create()
    task = celery_app.tasks["tasks.recompute_account"]
    task_failure.send(sender=task, task_id="t-limit", exception=TimeLimitExceeded(170.0),
                      args=[account, "MANUAL"], kwargs={"cause": "dunning recompute"})
    [row] = stuck(engine, account)
    assert (row["task_name"], row["state"], row["error_class"]) == ("tasks.recompute_account", "dead", "killed")
    assert row["task_args"] == {"account_id": account, "trigger": "MANUAL", "cause": "dunning recompute"}
    assert "TimeLimitExceeded" in row["error"]
