"""Signed-webhook ingest throughput and ack latency against the running web app (gunicorn, as in
the Procfile), next to the same server's throughput for a trivial endpoint, in the same run.

    .venv/bin/python bench/ingest.py [--requests 4000] [--clients 16] [--workers 2] [--repeat 3]
                                     [--worker-class gevent|gthread|sync] [--threads 8]

Servers: the same selection as the tests. A temporary database and Redis key prefix are created
and removed. Every signed event is an invoice.payment_failed for a different account, so every
request verifies the signature, stores the event, updates the mirror, creates a recompute request
and enqueues a task (the worst case: no coalescing). The customers are established ones: the
mirror has filed them under their accounts, as their earlier events did (``--new-customers``: each
event is its customer's first, which files it too). No worker consumes the queue, so queued
work does not compete for the CPU. Clients are separate processes with one connection per
request, for every endpoint alike. The three endpoints run in turn, ``--repeat`` times, and the
medians are quoted: one run on this shared machine varies by 10-20%.

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
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from multiprocessing.synchronize import Barrier
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


def client(port: int, requests: list[tuple[str, str, bytes, dict[str, str]]], ready: Barrier,
           out: multiprocessing.Queue) -> None:
    latencies = []
    errors = 0
    ready.wait()  # every client started: the clock starts now
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


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (Linux /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


class Window:
    """What a run measures: from the moment every client is ready to the last answer. Starting 16
    client processes takes about 70 ms, which is no work of the server's: timed, it cost a short
    run (`/healthz`'s) a larger share than a long one (ingest's)."""

    def __init__(self) -> None:
        self.elapsed = 0.0
        self.busy = self.total = 0.0  # the machine's CPU seconds in the window: in use, and all

    def __enter__(self) -> Window:
        self._start = time.perf_counter()
        self._machine = machine_busy()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, total = machine_busy()
        self.busy, self.total = busy - self._machine[0], total - self._machine[1]
        self.elapsed = time.perf_counter() - self._start


def run(port: int, requests: list, clients: int) -> tuple[float, list[float], int, Window]:
    chunks = [requests[i::clients] for i in range(clients)]
    out: multiprocessing.Queue = multiprocessing.Queue()
    ready = multiprocessing.Barrier(clients + 1)
    procs = [multiprocessing.Process(target=client, args=(port, chunk, ready, out)) for chunk in chunks]
    for p in procs:
        p.start()
    ready.wait()
    with Window() as window:
        results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    latencies = [x for lat, _ in results for x in lat]
    return len(requests) / window.elapsed, latencies, sum(e for _, e in results), window


def redis_cpu(broker: str) -> float:
    info = redis.Redis.from_url(broker).info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def measured(port: int, requests: list, clients: int, web_pid: int, db_url: str, broker: str) -> dict[str, Any]:
    """One run, with the CPU that the web workers and the app's PostgreSQL backends spent on it."""
    engine = make_engine(db_url)
    with engine.connect() as conn:
        backends = [int(r[0]) for r in conn.exec_driver_sql(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'dunning' AND pid <> pg_backend_pid()")]
    engine.dispose()
    workers = children(web_pid)
    web0, db0, redis0 = cpu_seconds(workers), cpu_seconds(backends), redis_cpu(broker)
    clients0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    rate, latencies, errors, window = run(port, requests, clients)
    clients1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    n = len(requests)
    client_s = (clients1.ru_utime + clients1.ru_stime) - (clients0.ru_utime + clients0.ru_stime)
    return {"rate": rate, "latencies": latencies, "errors": errors,
            "web_ms": (cpu_seconds(workers) - web0) / n * 1000, "db_ms": (cpu_seconds(backends) - db0) / n * 1000,
            "redis_ms": (redis_cpu(broker) - redis0) / n * 1000, "client_ms": client_s / n * 1000,
            "machine_ms": window.busy / n * 1000, "busy": window.busy / window.total}


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000


ENDPOINTS = (("trivial", "GET /healthz (trivial)"), ("ingest", "POST /webhooks/stripe (signed)"),
             ("ceiling", "POST /bench/verify-only (ceiling)"))


def batch_stats(port: int) -> tuple[float, float]:
    """(group commits, events) so far, from the server's /metrics (every worker's, multiprocess)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith(("dunning_webhook_batch_events_count", "dunning_webhook_batch_events_sum"))}
    return values.get("dunning_webhook_batch_events_count", 0.0), values.get("dunning_webhook_batch_events_sum", 0.0)


def wait_until_up(port: int, web: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    pause = threading.Event()
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline or web.poll() is not None:
            raise SystemExit("web app did not start")
        pause.wait(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4000, help="requests per endpoint and run")
    parser.add_argument("--clients", type=int, default=16, help="client processes (concurrent requests)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (the Procfile's WEB_CONCURRENCY)")
    parser.add_argument("--worker-class", choices=("gevent", "gthread", "sync"), default="gevent",
                        help="gunicorn worker class (the Procfile's: gevent); the others for comparison")
    parser.add_argument("--threads", type=int, default=8, help="threads per gthread worker")
    parser.add_argument("--new-customers", action="store_true", help="no customer filed in the mirror yet: "
                        "every event is its customer's first")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs of the three endpoints; medians")
    args = parser.parse_args()
    n = args.requests
    warm = n // 10
    total = warm + n * args.repeat  # every signed event is for an account of its own
    with bench_servers() as env_servers, tempfile.TemporaryDirectory() as metrics_dir:
        db_url, broker, prefix = env_servers.database_url, env_servers.broker_url, env_servers.key_prefix
        engine = make_engine(db_url)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO subs_account (account_id) SELECT 'acct_' || g FROM generate_series(1, %(n)s) g;"
                "INSERT INTO subs_customer (stripe_customer_id, account_id) "
                "SELECT 'cus_' || g, 'acct_' || g FROM generate_series(1, %(n)s) g", {"n": total})
            if not args.new_customers:
                # Established customers: the mirror has filed them under their accounts, as their
                # earlier events (the subscription, the invoice's creation) did before a payment could
                # fail. A customer's first mirror row ever files it (the trigger of
                # app/migrations/versions/mirror_account_key.py), once.
                conn.exec_driver_sql("INSERT INTO mirror_customer (stripe_customer_id, account_key) "
                                     "SELECT 'cus_' || g, 'acct_' || g FROM generate_series(1, %(n)s) g", {"n": total})
            # Only the tables that hold rows, as autovacuum would: a table analysed while empty gives
            # generic plans that scan it whole once it fills.
            conn.exec_driver_sql("ANALYZE subs_account, subs_customer"
                                 + ("" if args.new_customers else ", mirror_customer"))
        engine.dispose()
        port = free_port()
        env = {**os.environ, "DATABASE_URL": db_url, "CELERY_BROKER_URL": broker, "CELERY_BROKER_KEY_PREFIX": prefix,
               "STRIPE_WEBHOOK_SECRET": SECRET, "SERVICE_TOKENS": "bench", "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
        web = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "ceiling_app:create_app()", "--pythonpath", str(ROOT / "bench"),
             "--bind", f"127.0.0.1:{port}",
             "--workers", str(args.workers), "--worker-class", args.worker_class, "--log-level", "warning",
             *(["--threads", str(args.threads)] if args.worker_class == "gthread" else [])],
            env=env, cwd=ROOT)
        runs: dict[str, list[dict[str, Any]]] = {key: [] for key, _ in ENDPOINTS}
        try:
            wait_until_up(port, web)
            now = int(time.time())
            signed = []
            for g in range(1, total + 1):
                body = json.dumps(event("invoice.payment_failed", id=f"in_{g}", customer=f"cus_{g}", created=now))
                signed.append(("POST", "/webhooks/stripe", body.encode(),
                               {"Stripe-Signature": sign(body, SECRET), "Content-Type": "application/json"}))
            run(port, [("GET", "/healthz", b"", {})] * warm, args.clients)  # every worker connected and prepared
            run(port, signed[:warm], args.clients)
            batches0 = batch_stats(port)
            for r in range(args.repeat):
                mine = signed[warm + r * n: warm + (r + 1) * n]
                work: dict[str, list[tuple[str, str, bytes, dict[str, str]]]] = {
                    "trivial": [("GET", "/healthz", b"", {})] * n, "ingest": mine,
                    "ceiling": [("POST", "/bench/verify-only", body, headers) for _, _, body, headers in mine]}
                for key, _ in ENDPOINTS:
                    runs[key].append(measured(port, work[key], args.clients, web.pid, db_url, broker))
            batches1 = batch_stats(port)
            queued = redis.Redis.from_url(broker).llen(prefix + "recompute")
        finally:
            web.terminate()
            web.wait(30)

    kind = f"{args.worker_class} workers" + (f" x {args.threads} threads" if args.worker_class == "gthread" else "")
    print(f"\ngunicorn: {args.workers} {kind}; {args.clients} client processes; {n} requests per endpoint and run; "
          f"{args.repeat} interleaved runs, medians; "
          f"{'each event its customer first (--new-customers)' if args.new_customers else 'established customers'}")
    print(f"{'endpoint':<34}{'req/s':>7}{'p50 ms':>8}{'p99 ms':>8}{'errors':>7}{'web':>7}{'db':>7}{'redis':>7}"
          f"{'client':>7}{'machine':>8}{'busy':>6}")
    med = {key: {f: statistics.median(r[f] for r in runs[key]) for f in
                 ("rate", "web_ms", "db_ms", "redis_ms", "client_ms", "machine_ms", "busy")} for key, _ in ENDPOINTS}
    for key, label in ENDPOINTS:
        m, latencies = med[key], [x for r in runs[key] for x in r["latencies"]]
        errors = sum(r["errors"] for r in runs[key])
        print(f"{label:<34}{m['rate']:>7.0f}{pct(latencies, 50):>8.2f}{pct(latencies, 99):>8.2f}"
              f"{errors:>7}{m['web_ms']:>7.2f}{m['db_ms']:>7.2f}{m['redis_ms']:>7.2f}{m['client_ms']:>7.2f}"
              f"{m['machine_ms']:>8.2f}{m['busy']:>6.0%}")
    print("(CPU ms per request: in the gunicorn workers, the app's PostgreSQL backends, Redis, the client processes,"
          " the whole machine; busy: the machine's CPU in use during the run)")
    ratios = [i["rate"] / t["rate"] for i, t in zip(runs["ingest"], runs["trivial"], strict=True)]
    ceilings = [c["rate"] / t["rate"] for c, t in zip(runs["ceiling"], runs["trivial"], strict=True)]
    commits, events = batches1[0] - batches0[0], batches1[1] - batches0[1]
    print(f"signed ingest / trivial: {statistics.median(ratios):.2f} (each run: "
          f"{', '.join(f'{x:.2f}' for x in ratios)}); recomputes queued: {queued} of {warm + n * args.repeat}")
    print(f"events per group commit: {events / commits:.1f} on average ({events:.0f} events, {commits:.0f} commits)"
          if commits else "events per group commit: none measured")
    print(f"verify + extract only (no database, no broker) / trivial: {statistics.median(ceilings):.2f}"
          " -- the most any ingest design on this stack could reach")
    # The runs are bound by the machine's CPU, so the ratio follows machine CPU per request: half of
    # the trivial rate needs a webhook's own work (what it costs beyond the trivial request) to cost
    # no more than the trivial request itself.
    trivial_ms = med["trivial"]["machine_ms"]
    print(f"machine CPU per request beyond the trivial one's {trivial_ms:.2f} ms: signed ingest "
          f"+{med['ingest']['machine_ms'] - trivial_ms:.2f} ms, verify + extract only "
          f"+{med['ceiling']['machine_ms'] - trivial_ms:.2f} ms (half the trivial rate needs at most "
          f"+{trivial_ms:.2f})")
    return 0 if all(r["errors"] == 0 for r in runs["ingest"]) else 1


if __name__ == "__main__":
    sys.exit(main())
