"""Recomputes per second sustained by a real worker pool on the real broker and database, next to
the same pool's rate for a no-op task, measured in the same run; and where a recompute's time goes.

    .venv/bin/python bench/recompute.py [--accounts 4000] [--concurrency 2]

Servers: the same selection as the tests (DATABASE_URL / CELERY_BROKER_URL, else the standard local
ports, else private ones). A temporary database and Redis key prefix are created and removed.

Phases (each: consumers paused, N messages queued, consumers resumed, timed until the queue and
the unacked set are empty):
  noop          tasks.noop, the broker + worker overhead
  first         tasks.recompute_account on accounts never computed (writes state + outbox)
  steady        the same accounts again: nothing changed, so no write (the common case)
Then, in this process, run_recompute's own timings split into lock+gather / compute / apply / commit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis
from common import ROOT, bench_servers

from app.config import Settings
from app.db import make_engine
from app.policy_file import load_policy
from app.recompute.service import run_recompute
from tasks.factory import make_celery

SEED = """
INSERT INTO subs_account (account_id) SELECT 'acct_' || g FROM generate_series(1, %(n)s) g;
INSERT INTO subs_customer (stripe_customer_id, account_id)
SELECT 'cus_' || g, 'acct_' || g FROM generate_series(1, %(n)s) g;
INSERT INTO stripe_subscription (id, stripe_customer_id, status, products, source_created, source_rank)
SELECT 'sub_' || g, 'cus_' || g, 'active', '["prod_core"]', 1, 1 FROM generate_series(1, %(n)s) g;
-- every account: a paid invoice last month; every 2nd also an open one that failed two days ago
INSERT INTO stripe_invoice (id, stripe_customer_id, subscription_id, status, billing_reason, total, amount_due,
       amount_paid, amount_remaining, attempt_count, lines, created, paid_at, first_failed_at, last_failed_at,
       source_created, source_rank, source_event_id)
SELECT 'in_paid_' || g, 'cus_' || g, 'sub_' || g, 'paid', 'subscription_cycle', 5000, 5000, 5000, 0, 1,
       '[{"product": "prod_core", "amount": 5000}]', now() - interval '35 days', now() - interval '35 days',
       NULL, NULL, 1, 3, 'evt'
  FROM generate_series(1, %(n)s) g;
INSERT INTO stripe_invoice (id, stripe_customer_id, subscription_id, status, billing_reason, total, amount_due,
       amount_paid, amount_remaining, attempt_count, lines, created, paid_at, first_failed_at, last_failed_at,
       source_created, source_rank, source_event_id)
SELECT 'in_open_' || g, 'cus_' || g, 'sub_' || g, 'open', 'subscription_cycle', 5000, 5000, 0, 5000, 1,
       '[{"product": "prod_core", "amount": 5000}]', now() - interval '3 days', NULL,
       now() - interval '2 days', now() - interval '2 days', 1, 1, 'evt'
  FROM generate_series(2, %(n)s, 2) g;
INSERT INTO stripe_payment_attempt (id, stripe_customer_id, invoice_id, payment_method_id, status, amount,
       decline_code, failure_code, attempted_at, source_created, source_rank)
SELECT 'pi_' || g, 'cus_' || g, 'in_open_' || g, 'pm_' || g, 'failed', 5000, 'insufficient_funds', 'card_declined',
       now() - interval '2 days', 1, 1
  FROM generate_series(2, %(n)s, 2) g;
ANALYZE;
"""


def drain_rate(app, client: redis.Redis, prefix: str, queue: str, send) -> float:
    """Tasks per second: pause consumers, queue everything, resume; the clock starts when the
    workers take the first message (not when the resume command is sent) and stops when the queue
    and the unacknowledged set are both empty."""
    # limit=1: the one worker's reply ends the wait. Without it a broadcast waits its whole timeout
    # for replies, and a fast worker had drained most of the queue by then: only the tail was timed.
    app.control.cancel_consumer(queue, reply=True, timeout=5, limit=1)
    send()
    queued = client.llen(prefix + queue)
    app.control.add_consumer(queue, reply=True, timeout=5, limit=1)
    pause = threading.Event()
    while client.llen(prefix + queue) == queued:
        pause.wait(0.001)
    start = time.perf_counter()
    remaining = client.llen(prefix + queue)
    while client.llen(prefix + queue) or client.hlen(prefix + "unacked"):
        pause.wait(0.005)
    return (remaining + 1) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    n = args.accounts
    with bench_servers() as env_servers:
        db_url, broker, prefix = env_servers.database_url, env_servers.broker_url, env_servers.key_prefix
        engine = make_engine(db_url)
        with engine.begin() as conn:
            conn.exec_driver_sql(SEED, {"n": n})
        settings = Settings(database_url=db_url, broker_url=broker, broker_key_prefix=prefix)
        app = make_celery(settings)
        client = redis.Redis.from_url(broker)
        env = {**os.environ, "DATABASE_URL": db_url, "CELERY_BROKER_URL": broker, "CELERY_BROKER_KEY_PREFIX": prefix}
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-E", "-Q", "recompute", "-c",
             str(args.concurrency), "--prefetch-multiplier", "1", "-l", "warning", "--without-gossip",
             "--without-mingle", "-n", f"bench-{uuid.uuid4().hex[:6]}@%h"],
            env=env, cwd=ROOT)
        try:
            deadline = time.monotonic() + 60
            while not app.control.ping(timeout=1.0):
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise SystemExit("worker did not start")
            ids = [f"acct_{g}" for g in range(1, n + 1)]

            def send_noop() -> None:
                with app.producer_or_acquire() as producer:
                    for _ in range(n):
                        app.send_task("tasks.noop", queue="recompute", ignore_result=True, producer=producer)

            def send_recompute() -> None:
                with app.producer_or_acquire() as producer:
                    for account in ids:
                        app.send_task("tasks.recompute_account", args=[account, "DRIFT_DETECTED", "bench"],
                                      queue="recompute", ignore_result=True, producer=producer)

            rates = {
                "noop": drain_rate(app, client, prefix, "recompute", send_noop),
                "first": drain_rate(app, client, prefix, "recompute", send_recompute),
                "steady": drain_rate(app, client, prefix, "recompute", send_recompute),
            }
            with engine.connect() as conn:
                computed = conn.exec_driver_sql("SELECT count(*) FROM subs_dunning").scalar_one()
                events = conn.exec_driver_sql("SELECT count(*) FROM outbox").scalar_one()
        finally:
            worker.terminate()
            worker.wait(30)

        # Where the time goes, in this process (no broker): steady-state recomputes.
        policy = load_policy()
        now = datetime.now(UTC)
        sample = ids[: min(n, 2000)]
        timings: dict[str, list[float]] = {}
        for account in sample:
            result = run_recompute(engine, policy, account, "DRIFT_DETECTED", now)
            for step, seconds in result.timings.items():
                timings.setdefault(step, []).append(seconds)
        started = time.perf_counter()
        for account in sample:
            run_recompute(engine, policy, account, "DRIFT_DETECTED", now)
        inline_rate = len(sample) / (time.perf_counter() - started)
        engine.dispose()

    print(f"\nworker pool: {args.concurrency} prefork processes, prefetch 1, acks late, events on; {n} tasks per phase")
    print(f"{'phase':<34}{'tasks/s':>10}{'vs no-op':>10}")
    base = rates["noop"]
    for label, key in (("no-op task", "noop"), ("recompute, first (writes)", "first"),
                       ("recompute, steady (no change)", "steady")):
        print(f"{label:<34}{rates[key]:>10.0f}{rates[key] / base:>10.2f}")
    print(f"accounts with state: {computed}; outbox events written: {events}")
    print(f"\none process, no broker: {inline_rate:.0f} steady recomputes/s; mean per recompute:")
    total = sum(statistics.mean(v) for v in timings.values())
    for step in ("gather", "compute", "apply", "commit"):
        mean = statistics.mean(timings[step])
        print(f"  {step:<8}{mean * 1000:8.3f} ms  {mean / total:6.1%}")
    print("  (gather includes the advisory lock and taking the pending request; commit is the COMMIT round trip)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
