"""Signed-webhook ingest throughput and ack latency against the running web app (gunicorn, as in
the Procfile), next to the same server's throughput for a trivial endpoint, in the same run.

    .venv/bin/python bench/ingest.py [--requests 4000] [--clients 4] [--workers 2]

Servers: the same selection as the tests. A temporary database and Redis key prefix are created
and removed. Every signed event is an invoice.payment_failed for a different account, so every
request verifies the signature, stores the event, updates the mirror, creates a recompute request
and enqueues a task (the worst case: no coalescing). No worker consumes the queue, so queued
work does not compete for the CPU. Clients are separate processes with one connection per
request (gunicorn sync workers close the connection after each response).

The server is the product's app plus one bench-only route (bench/ceiling_app.py): the same signed
bodies posted to it are verified and extracted but neither stored nor enqueued, which measures the
most any ingest design could reach on this stack.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis
from common import ROOT, bench_servers

from app.db import make_engine
from tests.stripe_events import event, sign

SECRET = "whsec_bench_" + uuid.uuid4().hex


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client(port: int, requests: list[tuple[str, str, bytes, dict[str, str]]], out: multiprocessing.Queue) -> None:
    latencies = []
    errors = 0
    for method, path, body, headers in requests:
        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        conn.close()
        latencies.append(time.perf_counter() - start)
        errors += response.status != 200
    out.put((latencies, errors))


def run(port: int, requests: list, clients: int) -> tuple[float, list[float], int]:
    chunks = [requests[i::clients] for i in range(clients)]
    out: multiprocessing.Queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=client, args=(port, chunk, out)) for chunk in chunks]
    start = time.perf_counter()
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join()
    latencies = [x for lat, _ in results for x in lat]
    return len(requests) / elapsed, latencies, sum(e for _, e in results)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far (Linux /proc; 0 where unreadable)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def measured(port: int, requests: list, clients: int, web_pid: int, db_url: str) -> dict[str, Any]:
    """One run, with the CPU that the web workers and the app's PostgreSQL backends spent on it."""
    engine = make_engine(db_url)
    with engine.connect() as conn:
        backends = [int(r[0]) for r in conn.exec_driver_sql(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'dunning' AND pid <> pg_backend_pid()")]
    engine.dispose()
    workers = children(web_pid)
    web0, db0 = cpu_seconds(workers), cpu_seconds(backends)
    rate, latencies, errors = run(port, requests, clients)
    n = len(requests)
    return {"rate": rate, "latencies": latencies, "errors": errors,
            "web_ms": (cpu_seconds(workers) - web0) / n * 1000, "db_ms": (cpu_seconds(backends) - db0) / n * 1000}


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (the Procfile default is 2)")
    parser.add_argument("--threads", type=int, default=1, help="threads per worker (1: sync workers)")
    args = parser.parse_args()
    n = args.requests
    warm = n // 10
    total = n + warm  # the signed warm-up uses accounts of its own
    with bench_servers() as env_servers:
        db_url, broker, prefix = env_servers.database_url, env_servers.broker_url, env_servers.key_prefix
        engine = make_engine(db_url)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO subs_account (account_id) SELECT 'acct_' || g FROM generate_series(1, %(n)s) g;"
                "INSERT INTO subs_customer (stripe_customer_id, account_id) "
                "SELECT 'cus_' || g, 'acct_' || g FROM generate_series(1, %(n)s) g; ANALYZE", {"n": total})
        engine.dispose()
        port = free_port()
        env = {**os.environ, "DATABASE_URL": db_url, "CELERY_BROKER_URL": broker, "CELERY_BROKER_KEY_PREFIX": prefix,
               "STRIPE_WEBHOOK_SECRET": SECRET, "SERVICE_TOKENS": "bench"}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        web = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "ceiling_app:create_app()", "--pythonpath", str(ROOT / "bench"),
             "--bind", f"127.0.0.1:{port}",
             "--workers", str(args.workers), "--threads", str(args.threads),
             "--worker-class", "sync" if args.threads == 1 else "gthread", "--log-level", "warning"],
            env=env, cwd=ROOT)
        try:
            deadline = time.monotonic() + 60
            pause = threading.Event()
            while True:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    conn.request("GET", "/healthz")
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline or web.poll() is not None:
                    raise SystemExit("web app did not start")
                pause.wait(0.1)
            trivial = [("GET", "/healthz", b"", {})] * n
            signed = []
            now = int(time.time())
            for g in range(1, total + 1):
                body = json.dumps(event("invoice.payment_failed", id=f"in_{g}", customer=f"cus_{g}", created=now))
                signed.append(("POST", "/webhooks/stripe", body.encode(),
                               {"Stripe-Signature": sign(body, SECRET), "Content-Type": "application/json"}))
            run(port, trivial[:warm], args.clients)  # warm-up: every worker has connected and prepared
            run(port, signed[:warm], args.clients)
            trivial_run = measured(port, trivial, args.clients, web.pid, db_url)
            ingest_run = measured(port, signed[warm:], args.clients, web.pid, db_url)
            ceiling = [("POST", "/bench/verify-only", body, headers) for _, _, body, headers in signed[warm:]]
            ceiling_run = measured(port, ceiling, args.clients, web.pid, db_url)
            queued = redis.Redis.from_url(broker).llen(prefix + "recompute")
        finally:
            web.terminate()
            web.wait(30)

    kind = "sync workers" if args.threads == 1 else f"gthread workers x {args.threads} threads"
    print(f"\ngunicorn: {args.workers} {kind}; {args.clients} client processes; {n} requests each run")
    print(f"{'endpoint':<34}{'req/s':>7}{'p50 ms':>8}{'p99 ms':>8}{'errors':>7}{'web CPU ms':>12}{'db CPU ms':>11}")
    for label, r in (("GET /healthz (trivial)", trivial_run), ("POST /webhooks/stripe (signed)", ingest_run),
                     ("POST /bench/verify-only (ceiling)", ceiling_run)):
        print(f"{label:<34}{r['rate']:>7.0f}{pct(r['latencies'], 50):>8.2f}{pct(r['latencies'], 99):>8.2f}"
              f"{r['errors']:>7}{r['web_ms']:>12.2f}{r['db_ms']:>11.2f}")
    print("(web / db CPU: per request, in the gunicorn workers / the app's PostgreSQL backends)")
    ratio = ingest_run["rate"] / trivial_run["rate"]
    print(f"signed ingest / trivial: {ratio:.2f}; recomputes queued: {queued} of {total}")
    print(f"verify + extract only (no database, no broker) / trivial: {ceiling_run['rate'] / trivial_run['rate']:.2f}"
          " -- the most any ingest design on this stack could reach")
    ingest_err = ingest_run["errors"]
    return 0 if ingest_err == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
