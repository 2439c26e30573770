"""The periodic paths other than the drift sweep, at production's volumes: what each statement costs.

    .venv/bin/python bench/periodic.py                 # the sizes below (about 3 minutes to fill)
    .venv/bin/python bench/periodic.py --scale 0.1     # a tenth of every volume

A temporary database (same server selection as the tests) is migrated and filled with
INSERT ... SELECT generate_series (scale 1):

* 600,000 accounts with a customer and a stored decision; 500,000 of them with a retry planned (an
  open failed invoice each), 2,000 due now; one in 1,000 of them lifting;
* the outbox after an Account Management outage: 200,000 undelivered rows over 50,000 accounts (each
  ready: its backoff over), beside 3,000,000 delivered (2,500,000 past HISTORY_RETENTION_DAYS);
* 5,000,000 stripe_event rows, 1% unroutable (customers no account maps; --unroutable-percent) and 1%
  enqueue_failed;
* 100,000 subs_stuck_events (60% resolved, 30% retrying, 10% dead), 20,000 recompute requests;
* 2,000,000 payment_retry rows of history (never pruned), 1,000 of them claimed recently;
* 2,000,000 drift_record rows past retention; 200,000 bad-debt payments (300 pending).

Then it prints, with the app's session settings (jit off): each periodic statement's EXPLAIN ANALYZE
time and whether it scans a whole table; GET /metrics, /ops/outbox, /ops/stuck-events, /ops/lifting
through the Flask test client; one re-drive tick, one retry dispatch; relay passes against the fake
Account Management (tests/fakes) one account at a time and PASS_CONCURRENCY at a time; and
`dunning history prune`'s run: rows removed, transactions, the most rows one transaction removed.
The database is dropped afterwards.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import Engine

from app import create_app, metrics_db, redrive, stuck_work
from app.config import Settings
from app.db import make_engine
from app.history import prune
from app.migrate import upgrade
from app.outbox import backlog, relay
from app.payments import retries
from app.policy_file import load_policy
from app.runtime import Runtime
from app.sweep import lifting
from tasks.factory import make_celery
from tests import servers
from tests.fakes.fake_account_management import FakeAccountManagement

FILL = """
SET statement_timeout = 0;
INSERT INTO subs_account (account_id) SELECT 'acct_' || lpad(g::text, 8, '0') FROM generate_series(1, %(accounts)s) g;
INSERT INTO subs_customer (stripe_customer_id, account_id, created_at)
SELECT 'cus_' || lpad(g::text, 8, '0'), 'acct_' || lpad(g::text, 8, '0'), now() - make_interval(mins => g)
  FROM generate_series(1, %(accounts)s) g;
INSERT INTO stripe_invoice (id, stripe_customer_id, status, billing_reason, total, amount_due, amount_paid,
       amount_remaining, attempt_count, lines, created, first_failed_at, last_failed_at, source_created, source_rank,
       source_event_id)
SELECT 'in_' || g, 'cus_' || lpad(g::text, 8, '0'), 'open', 'subscription_cycle', 5000, 5000, 0, 5000, 1,
       '[{"product": "prod_core", "amount": 5000}]', now() - interval '3 days', now() - interval '3 days',
       now() - interval '3 days', 1, 1, 'evt_bench'
  FROM generate_series(1, %(retrying)s) g;
INSERT INTO subs_dunning (account_id, status, level, entitlements, policy_version, version, next_retry_at,
                          retry_invoice_id, retry_payment_method_id, next_review_at, changed_at)
SELECT 'acct_' || lpad(g::text, 8, '0'),
       CASE WHEN g <= %(retrying)s THEN CASE WHEN g %% 1000 = 0 THEN 'lifting' ELSE 'past_due' END ELSE 'current' END,
       'none', '{"products": {"prod_core": "full"}}'::jsonb, 'v1', 3,
       CASE WHEN g <= %(due)s THEN now() - interval '1 minute'
            WHEN g <= %(retrying)s THEN now() + make_interval(mins => g %% 10000 + 10) END,
       CASE WHEN g <= %(retrying)s THEN 'in_' || g END, CASE WHEN g <= %(retrying)s THEN 'pm_' || g END,
       CASE WHEN g %% 3 = 0 THEN now() + make_interval(mins => g %% 50000 + 10) END, now() - interval '2 hours'
  FROM generate_series(1, %(accounts)s) g;
INSERT INTO bad_debt_payment (account_id, idempotency_key, request_fingerprint, amount, invoice_ids, state, created_at,
                              updated_at)
SELECT 'acct_' || lpad((g %% %(accounts)s + 1)::text, 8, '0'), 'k' || g, 'f', 5000, jsonb_build_array('in_old_' || g),
       CASE WHEN g <= 300 THEN 'pending' ELSE 'succeeded' END, now() - make_interval(hours => g %% 5000), now()
  FROM generate_series(1, %(payments)s) g;
INSERT INTO outbox (account_id, dunning_version, event_type, payload, created_at, delivered_at, attempts, state,
                    next_attempt_at)
SELECT 'acct_' || lpad((g %% %(accounts)s + 1)::text, 8, '0'), g, 'EntitlementsChanged',
       '{"entitlements": {"products": {"prod_core": "full"}}}'::jsonb,
       now() - make_interval(days => CASE WHEN g <= %(outbox_old)s THEN 91 + g %% 300 ELSE g %% 89 END),
       now() - make_interval(days => CASE WHEN g <= %(outbox_old)s THEN 91 + g %% 300 ELSE g %% 89 END),
       1, 'delivered', now()
  FROM generate_series(1, %(outbox_done)s) g;
INSERT INTO outbox (account_id, dunning_version, event_type, payload, created_at, next_attempt_at, attempts, last_error,
                    last_status)
SELECT 'acct_' || lpad((g %% %(backlog_accounts)s + 1)::text, 8, '0'), 10 + g / %(backlog_accounts)s,
       CASE WHEN g %% 4 = 1 THEN 'PaymentFailed' WHEN g %% 4 = 2 THEN 'DunningEntered' ELSE 'EntitlementsChanged' END,
       CASE WHEN g %% 4 IN (1, 2) THEN '{"attempt_id": "pi_1", "failure_class": "transient"}'::jsonb
            ELSE '{"entitlements": {"products": {"prod_core": "read_only"}}}'::jsonb END,
       now() - interval '2 hours', now() - interval '1 second', 3, 'HTTP 503: down', 503
  FROM generate_series(0, %(backlog)s - 1) g;
INSERT INTO stripe_event (id, type, stripe_created, stripe_customer_id, account_id, trigger, state, raw_body,
                          received_at, processed_at)
SELECT 'evt_' || lpad(g::text, 10, '0'), 'invoice.payment_failed', 1700000000 + g,
       CASE WHEN g %% 100 >= 100 - %(unroutable_percent)s THEN 'cus_unknown_' || (g %% 20000)
            ELSE 'cus_' || lpad((g %% %(accounts)s + 1)::text, 8, '0') END,
       CASE WHEN g %% 100 >= 100 - %(unroutable_percent)s THEN NULL
            ELSE 'acct_' || lpad((g %% %(accounts)s + 1)::text, 8, '0') END,
       'PAYMENT_FAILED',
       CASE WHEN g %% 100 >= 100 - %(unroutable_percent)s THEN 'unroutable' WHEN g %% 100 = 1 THEN 'enqueue_failed'
            ELSE 'accepted' END,
       repeat('x', 300), now() - make_interval(secs => (%(events)s - g) * 3), now()
  FROM generate_series(1, %(events)s) g;
INSERT INTO recompute_request (account_id, trigger, cause, requested_at, touched_at)
SELECT 'acct_' || lpad((g * 7)::text, 8, '0'), 'PAYMENT_FAILED', 'evt', now() - make_interval(secs => g %% 600), now()
  FROM generate_series(1, %(requests)s) g;
INSERT INTO subs_stuck_events (account_id, task_name, task_args, error_class, error, attempts, state, first_failed_at,
                               last_failed_at, next_redrive_at, resolved_at)
SELECT 'acct_' || lpad((g %% %(accounts)s + 1)::text, 8, '0'),
       CASE WHEN g %% 3 = 0 THEN 'tasks.recompute_account' ELSE 'tasks.deliver_account_outbox' END,
       jsonb_build_object('account_id', 'acct_' || lpad((g %% %(accounts)s + 1)::text, 8, '0')),
       'database', 'OperationalError: boom', 3,
       CASE WHEN g %% 10 < 6 THEN 'resolved' WHEN g %% 10 < 9 THEN 'retrying' ELSE 'dead' END,
       now() - make_interval(days => g %% 200), now() - make_interval(days => g %% 200),
       CASE WHEN g %% 10 BETWEEN 6 AND 8 THEN now() + make_interval(secs => g %% 3000 - 600) END,
       CASE WHEN g %% 10 < 6 THEN now() - make_interval(days => g %% 200) END
  FROM generate_series(1, %(stuck)s) g;
INSERT INTO payment_retry (account_id, invoice_id, payment_method_id, retry_number, free, idempotency_key,
                           scheduled_for, state, created_at, updated_at)
SELECT 'acct_' || lpad((g %% %(accounts)s + 1)::text, 8, '0'), 'in_hist_' || g, 'pm_' || g, 1, false,
       'retry:in_hist_' || g, now() - make_interval(mins => g), CASE WHEN g <= 1000 THEN 'dispatched' ELSE 'failed' END,
       now() - make_interval(mins => g), now() - make_interval(mins => g)
  FROM generate_series(1, %(retry_history)s) g;
INSERT INTO drift_record (account_id, found_at, stored, desired, fields)
SELECT 'acct_' || lpad((g %% %(accounts)s + 1)::text, 8, '0'), now() - make_interval(days => 100 + g %% 200),
       '{"status": "current"}', '{"status": "past_due"}', '["status"]'
  FROM generate_series(1, %(drift)s) g;
"""

SIZES = {"accounts": 600_000, "retrying": 500_000, "due": 2_000, "payments": 200_000, "outbox_done": 3_000_000,
         "outbox_old": 2_500_000, "backlog": 200_000, "backlog_accounts": 50_000, "events": 5_000_000,
         "requests": 20_000, "stuck": 100_000, "retry_history": 2_000_000, "drift": 2_000_000}

SERVICE_TOKEN = "bench-service-token-0123456789"


def statements(now: datetime) -> dict[str, tuple[str, dict[str, Any] | None]]:
    cutoff = now - timedelta(days=90)
    out: dict[str, tuple[str, dict[str, Any] | None]] = {
        "relay: ready accounts (5000)": (relay.READY_ACCOUNTS_SQL, {"now": now, "limit": 5000}),
        "relay: an account's rows": (relay.PENDING_SQL, {"account": "acct_00000005", "limit": 200}),
        "backlog (GET /ops/outbox, tasks.relay_outbox)": (backlog.BACKLOG_SQL, None),
        "/metrics database gauges": (metrics_db.GAUGES_SQL, {"guard": 30}),
        "/ops/lifting": (lifting.STUCK_LIFTING_SQL, {"before": now - timedelta(minutes=30), "limit": 100}),
        # A tick's routing: the customers mapped since the last tick and the recheck of the last minutes'
        # (FILL's one a minute: 10), the events of 1,000 customers, the newest events naming
        # no customer, a walk's share of the unroutable events, and routing what those found (a walk's
        # share of the never-routed events: the FILL's unroutable ids include those ending in 99).
        "re-drive: route, mapped customers": (redrive.MAPPED, {
            "at": now - timedelta(minutes=1), "after_id": "", "page": redrive.MAPPED_PER_TICK,
            "recheck_since": now - redrive.MAPPED_OVERLAP, "recheck": redrive.MAPPED_RECHECK}),
        "re-drive: route, their events": (redrive.NEWLY_MAPPED, {
            "customers": [f"cus_{g:08d}" for g in range(1, 1001)], "limit": 5000}),
        "re-drive: route, newest": (redrive.RECENT, {"since": now - redrive.RECENT_WINDOW,
                                                     "limit": redrive.RECENT_PER_TICK}),
        "re-drive: route, walk": (redrive.WALK, {"at": redrive.NEG_INFINITY, "after_id": "",
                                                 "limit": redrive.WALK_PER_TICK}),
        "re-drive: route unroutable": (redrive.ROUTE_UNROUTABLE, {
            "ids": [f"evt_{g:010d}" for g in range(99, 100 * redrive.WALK_PER_TICK, 100)], "limit": 5000}),
        "re-drive: due reviews": (redrive.DUE_REVIEWS, {"limit": 5000, "now": now}),
        "re-drive: stale requests": (redrive.STALE_REQUESTS, {"age": 60, "limit": 5000}),
        "re-drive stuck: due rows": (stuck_work.DUE_SQL, {"every": 300, "limit": 200}),
        "stuck: counts": (stuck_work.COUNTS_SQL, None),
        "stuck: list (GET /ops/stuck-events)": (stuck_work.LIST_SQL, {"state": None, "account": None, "limit": 100}),
        "dispatch: due retries": (retries.DUE_SQL, {"now": now, "limit": 500}),
        "dispatch: claimed, unsent": (retries.UNSENT_SQL, {"now": now, "stale": 120, "guard": 30, "limit": 500}),
        "dispatch: claimed, never sent": (retries.UNSENT_TOO_LONG_SQL, {"now": now, "guard": 30, "limit": 500}),
    }
    for h in prune.HISTORIES:
        out[f"prune: a batch of {h.table}"] = (prune._delete_sql(h), {"cutoff": cutoff, "batch": prune.BATCH_SIZE})
    return out


def explain(engine: Engine, now: datetime) -> None:
    print("statement | ms (EXPLAIN ANALYZE, rolled back) | tables read whole")
    for name, (sql, params) in statements(now).items():
        with engine.connect() as conn:
            plan = [r[0] for r in conn.exec_driver_sql("EXPLAIN (ANALYZE) " + sql, params)]
            conn.rollback()
        ms = next(float(line.split()[2]) for line in plan if line.startswith("Execution Time"))
        scans = sorted({line.split("Seq Scan on ")[1].split()[0] for line in plan if "Seq Scan on " in line})
        print(f"  {name}: {ms:,.1f} ms; {', '.join(scans) or '-'}", flush=True)


def timed(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def endpoints(url: str) -> None:
    settings = Settings(database_url=url, broker_url="redis://127.0.0.1:6379/0", stripe_webhook_secret="whsec_bench",
                        service_tokens={SERVICE_TOKEN: "bench"}, secret_key="bench")
    runtime = Runtime.build(settings)
    client = create_app(settings, runtime=runtime, celery=make_celery(settings)).test_client()
    auth = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    for path, headers in (("/metrics", {}), ("/ops/outbox", auth), ("/ops/stuck-events", auth),
                          ("/ops/stuck-events?state=dead", auth), ("/ops/lifting", auth)):
        def get(p: str = path, h: dict[str, str] = headers) -> Any:
            return client.get(p, headers=h)

        seconds, response = timed(get)
        print(f"  GET {path}: {response.status_code}, {len(response.data):,} bytes, "
              f"{seconds * 1000:,.0f} ms (best of 3)")
    runtime.engine.dispose()


def ticks(engine: Engine) -> None:
    class NoBroker:  # the re-drive's sends are not measured: its statements are
        pass

    for run in (1, 2):  # the routing alone, rolled back (its cursors stay at the start)
        with engine.connect() as conn:
            start = time.perf_counter()
            with conn.begin() as tx:
                routed = redrive.route_unroutable(conn, 5000)
                seconds = time.perf_counter() - start
                tx.rollback()
        print(f"  re-drive routing {run}: {seconds:.3f} s, {len(routed)} routed")
    real_send = redrive.send_many
    redrive.send_many = lambda *_: None
    try:
        for run in (1, 2):
            seconds, report = timed(lambda: redrive.redrive(engine, NoBroker()), repeat=1)
            print(f"  re-drive tick {run}: {seconds:.2f} s {report}")
    finally:
        redrive.send_many = real_send
    seconds, ids = timed(lambda: retries.claim_due(engine, datetime.now(UTC)), repeat=1)
    print(f"  retry dispatch (claim_due): {seconds:.2f} s, {len(ids)} claimed or sent again")
    seconds, requested = timed(lambda: retries.expire_unsent(engine, datetime.now(UTC)), repeat=1)
    print(f"  retry dispatch (expire_unsent): {seconds:.2f} s, {len(requested)} accounts")


def relay_passes(engine: Engine, passes: int) -> None:
    with FakeAccountManagement() as am:
        for concurrency in (1, relay.PASS_CONCURRENCY):
            for n in range(passes):
                start = time.perf_counter()
                report = relay.relay(engine, am.url, budget_seconds=20.0, concurrency=concurrency)
                seconds = time.perf_counter() - start
                rows = report.delivered + report.superseded
                print(f"  relay pass, {concurrency} at a time ({n + 1}): {seconds:.1f} s, "
                      f"{report.accounts:,} accounts, "
                      f"{rows:,} rows ({report.delivered:,} delivered, {report.superseded:,} superseded), "
                      f"{rows / seconds:,.0f} rows/s", flush=True)


def prune_run(engine: Engine) -> None:
    batches: list[int] = []
    real = prune._delete_batch

    def counted(*args: Any, **kwargs: Any) -> int:
        removed = real(*args, **kwargs)
        batches.append(removed)
        return removed

    prune._delete_batch = counted
    try:
        start = time.perf_counter()
        report = prune.prune(engine, load_policy(), 90)
        seconds = time.perf_counter() - start
    finally:
        prune._delete_batch = real
    print(f"  history prune: {seconds:.1f} s, removed {report.removed}, {len(batches)} transactions, at most "
          f"{max(batches, default=0):,} rows in one")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="every volume times this (1)")
    parser.add_argument("--passes", type=int, default=2, help="relay passes of each kind (2)")
    parser.add_argument("--unroutable-percent", type=int, default=1, choices=range(1, 99), metavar="1-98",
                        help="share of the events that never route, in percent (1)")
    args = parser.parse_args(argv)
    sizes = {k: max(1, int(v * args.scale)) for k, v in SIZES.items()}
    with servers.postgres_admin_url() as admin, servers.test_database(admin) as url:
        upgrade(url)
        engine = make_engine(url, pool_size=9, max_overflow=1)
        start = time.perf_counter()
        with engine.begin() as conn:
            conn.exec_driver_sql(FILL, {**sizes, "unroutable_percent": args.unroutable_percent})
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")
        print(f"filled in {time.perf_counter() - start:.0f} s: " + ", ".join(f"{k} {v:,}" for k, v in sizes.items()),
              flush=True)
        explain(engine, datetime.now(UTC))
        endpoints(url)
        ticks(engine)
        relay_passes(engine, args.passes)
        prune_run(engine)
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
