"""Drift sweep throughput against the real PostgreSQL, next to a plain streaming read of the same rows.

    .venv/bin/python bench/sweep.py                      # 100,000 then 1,000,000 accounts
    .venv/bin/python bench/sweep.py --accounts 100000    # one size

For each size: a temporary database (same server selection as the tests: DATABASE_URL /
TEST_DATABASE_URL, else 127.0.0.1:5432, else a private PostgreSQL) is created, migrated and filled
with INSERT ... SELECT generate_series: every account has a customer and a stored dunning row, half
have a subscription, a fraction have invoices and failed attempts in the Stripe mirror (some paid,
some unpaid and therefore drifted), then vacuumed and analysed. Then, in the same run:

* plain read (the yardstick, bench/plain_read.py): every row the sweep reads, one server-side-cursor SELECT
  per table its gather reads (the gathered columns only, plain tuples, no JSON aggregation), in batches;
  its rate is N accounts / its total time, and rows/s;
* subs_account only: the yardstick quoted before it was corrected (the subs_account rows alone), still
  printed so both ratios can be compared;
* sweep: the real Sweeper in dry-run mode, same batch: a read-ahead thread runs the two statements of
  each keyset page (gather_batch.py) while the sweep's thread builds the snapshots, runs compute and
  compares (drift). One process, wall-clock time from the first page to the last; PostgreSQL works
  on the next page meanwhile (on this machine's other core).

Each size runs the three readers in turn ``--repeat`` times (3) and quotes the medians; a single run
on this shared machine varies by about ±30%. It prints accounts/s for all three, the ratios, where
the sweep's time goes, and peak memory (ru_maxrss after each phase; memory is flat when the
1,000,000 run peaks where the 100,000 run does). The database is dropped afterwards.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plain_read import read_subs_account_only, read_swept_rows

from app.db import make_engine
from app.migrate import upgrade
from app.policy_file import load_policy
from app.sweep.refile import refile_customers
from app.sweep.sweep import BATCH_SIZE, Sweeper
from tests import servers

# Every account: customer + a stored "current" dunning row whose entitlements match its subscription.
# Every 2nd account: an active subscription. Every 10th: a paid invoice with a succeeded attempt.
# Every 40th: an open invoice with a failed attempt 5-20 days ago (drift: stored says current).
FILL = """
INSERT INTO subs_account (account_id)
SELECT 'acct_' || lpad(g::text, 8, '0') FROM generate_series(1, %(n)s) g;
INSERT INTO subs_customer (stripe_customer_id, account_id)
SELECT 'cus_' || lpad(g::text, 8, '0'), 'acct_' || lpad(g::text, 8, '0') FROM generate_series(1, %(n)s) g;
INSERT INTO stripe_subscription (id, stripe_customer_id, status, products, source_created, source_rank)
SELECT 'sub_' || g, 'cus_' || lpad(g::text, 8, '0'), 'active', '["prod_core"]', 1, 1
  FROM generate_series(2, %(n)s, 2) g;
INSERT INTO subs_dunning (account_id, status, level, entitlements, policy_version, version)
SELECT 'acct_' || lpad(g::text, 8, '0'), 'current', 'none',
       CASE WHEN g %% 2 = 0 THEN '{"products": {"prod_core": "full"}, "plan_changes": true}'::jsonb
            ELSE '{"products": {}, "plan_changes": true}'::jsonb END,
       %(policy)s, 1
  FROM generate_series(1, %(n)s) g;
INSERT INTO stripe_invoice (id, stripe_customer_id, subscription_id, status, billing_reason, total, amount_due,
                            amount_paid, amount_remaining, attempt_count, lines, created, paid_at, first_failed_at,
                            last_failed_at, source_created, source_rank, source_event_id)
SELECT 'in_' || g, 'cus_' || lpad(g::text, 8, '0'), 'sub_' || g,
       CASE WHEN g %% 40 = 0 THEN 'open' ELSE 'paid' END, 'subscription_cycle', 5000, 5000,
       CASE WHEN g %% 40 = 0 THEN 0 ELSE 5000 END, CASE WHEN g %% 40 = 0 THEN 5000 ELSE 0 END, 1,
       '[{"product": "prod_core", "amount": 5000}]', now() - make_interval(days => 5 + g %% 15) - interval '1 hour',
       CASE WHEN g %% 40 = 0 THEN NULL ELSE now() - make_interval(days => 5 + g %% 15) END,
       CASE WHEN g %% 40 = 0 THEN now() - make_interval(days => 5 + g %% 15) END,
       CASE WHEN g %% 40 = 0 THEN now() - make_interval(days => 5 + g %% 15) END, 1, 1, 'evt_bench'
  FROM generate_series(10, %(n)s, 10) g;
INSERT INTO stripe_payment_attempt (id, stripe_customer_id, invoice_id, charge_id, payment_method_id, status, amount,
                                    decline_code, failure_code, attempted_at, source_created, source_rank)
SELECT 'pi_' || g, 'cus_' || lpad(g::text, 8, '0'), 'in_' || g, 'ch_' || g, 'pm_' || g,
       CASE WHEN g %% 40 = 0 THEN 'failed' ELSE 'succeeded' END, 5000,
       CASE WHEN g %% 40 = 0 THEN 'insufficient_funds' END, CASE WHEN g %% 40 = 0 THEN 'card_declined' END,
       now() - make_interval(days => 5 + g %% 15), 1, 1
  FROM generate_series(10, %(n)s, 10) g;
"""



def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux



def run(admin_url: str, n: int, batch: int, repeat: int) -> dict[str, Any]:
    policy = load_policy()
    with servers.test_database(admin_url) as url:
        upgrade(url)
        # The sweep lock's connection, two page readers' and the sweep's own (the as-read check of a page
        # with drift): with 2 the as-read check waited for a connection until the pool's timeout.
        engine = make_engine(url, pool_size=4, max_overflow=0)
        # The bench fills a million rows in one statement batch; the app's 10 s statement timeout
        # is for its own queries, not this.
        with engine.begin() as conn:
            conn.exec_driver_sql("SET statement_timeout = 0")
            seconds_fill = time.perf_counter()
            conn.exec_driver_sql(FILL, {"n": n, "policy": policy.version})
            seconds_fill = time.perf_counter() - seconds_fill
        # The steady state the beat task keeps: every mapped customer filed under its account (the
        # rows inserted above were filed by the trigger; customers without mirror rows are filed here).
        seconds_refile = time.perf_counter()
        filed = 0
        while batch_filed := refile_customers(engine, limit=50_000).filed:  # batches: memory stays flat
            filed += batch_filed
        seconds_refile = time.perf_counter() - seconds_refile
        # Settle the fresh rows as a table that has been live for a while is: hint bits set,
        # visibility map and statistics current. Otherwise the first reader (the plain read) pays
        # for writing hint bits on every page and the comparison flatters the sweep.
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")
        print(f"  generated {n:,} accounts in {seconds_fill:.1f}s; filed {filed:,} customers without mirror rows "
              f"in {seconds_refile:.1f}s", flush=True)
        base = maxrss_mb()
        plains, olds, reports = [], [], []
        after_plain = base
        # Interleaved repeats, medians quoted: a single run on this shared machine varies by ±30%.
        for rep in range(1, repeat + 1):
            plain = read_swept_rows(engine, batch)
            after_plain = max(after_plain, maxrss_mb())
            old_rows, old_seconds = read_subs_account_only(engine, batch)
            report = Sweeper(engine, policy, None, dry_run=True, batch_size=batch).start()
            plains.append(n / plain.seconds)
            olds.append(old_rows / old_seconds)
            reports.append(report)
            sweep_rate = report.scanned / report.seconds
            print(f"  run {rep}: plain read of the swept rows {plain.rows:,} rows of {len(plain.rows_by_table)} tables "
                  f"in {plain.seconds:.2f}s = {n / plain.seconds:,.0f} accounts/s; subs_account only "
                  f"{old_rows / old_seconds:,.0f} rows/s; sweep {sweep_rate:,.0f} accounts/s = "
                  f"{sweep_rate / plains[-1]:.2f} of the plain read", flush=True)
        print("    rows read: " + ", ".join(f"{t} {c:,}" for t, c in plain.rows_by_table.items() if c), flush=True)
        after_sweep = maxrss_mb()
        engine.dispose()
    report = sorted(reports, key=lambda r: r.scanned / r.seconds)[len(reports) // 2]  # the median sweep
    rate_sweep = report.scanned / report.seconds
    plain_accounts = statistics.median(plains)
    old_rate = statistics.median(olds)
    return {"accounts": n, "batch": batch, "plain_accounts": plain_accounts,
            "plain_rows": plain.rows * plain_accounts / n, "old_rate": old_rate, "sweep_rate": rate_sweep,
            "ratio": rate_sweep / plain_accounts, "old_ratio": rate_sweep / old_rate,
            "ratios": [r.scanned / r.seconds / p for r, p in zip(reports, plains, strict=True)],
            "sweep_seconds": report.seconds, "scanned": report.scanned,
            "drifted": report.drifted, "timings": report.timings, "rss_base": base, "rss_plain": after_plain,
            "rss_sweep": after_sweep}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, action="append",
                        help="how many accounts (repeatable); default: 100000 and 1000000")
    parser.add_argument("--batch", type=int, default=BATCH_SIZE,
                        help=f"sweep batch = plain-read fetch size (the sweep's own: {BATCH_SIZE})")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs of each reader; medians (3)")
    args = parser.parse_args(argv)
    sizes = args.accounts or [100_000, 1_000_000]
    results = []
    with servers.postgres_admin_url() as admin:
        for n in sizes:
            print(f"{n:,} accounts (batch {args.batch}):", flush=True)
            r = run(admin, n, args.batch, args.repeat)
            results.append(r)
            t = r["timings"]
            total = r["sweep_seconds"]
            print(f"  medians: plain read {r['plain_accounts']:,.0f} accounts/s; sweep (dry run) {r['scanned']:,} "
                  f"accounts, {r['drifted']:,} drifted, {r['sweep_rate']:,.0f} accounts/s = {r['ratio']:.2f} of the "
                  f"plain read of the swept rows ({r['old_ratio']:.2f} of the subs_account-only read); per run "
                  + ", ".join(f"{x:.2f}" for x in r["ratios"]))
            print("  sweep time: " + ", ".join(f"{k} {v:.2f}s ({v / total:.0%})" for k, v in t.items())
                  + "  (wait = for the read-ahead thread's next page; gather = building the snapshots)")
            print(f"  peak RSS: {r['rss_base']:.0f} MB before, {r['rss_plain']:.0f} MB after the plain reads, "
                  f"{r['rss_sweep']:.0f} MB after the sweep", flush=True)
    print()
    print("| accounts | plain read of the swept rows (accounts/s; rows/s) | sweep (accounts/s) | sweep / plain "
          "(per run) | subs_account only (rows/s) | sweep / subs_account only | peak RSS after sweep |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        runs = ", ".join(f"{x:.2f}" for x in r["ratios"])
        print(f"| {r['accounts']:,} | {r['plain_accounts']:,.0f}; {r['plain_rows']:,.0f} | {r['sweep_rate']:,.0f} | "
              f"{r['ratio']:.2f} ({runs}) | {r['old_rate']:,.0f} | {r['old_ratio']:.2f} | {r['rss_sweep']:.0f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
