"""Migrations request_created_at and subscription_collection_paused on a database holding rows at the
revision before them, as a deploy meets it.

Both add a NOT NULL column to a table every webhook writes (recompute_request, stripe_subscription):
with a default PostgreSQL does not evaluate per row (now(): stable; '{}': a constant) it is stored
once for the existing rows, no table rewrite under the ACCESS EXCLUSIVE lock that blocks ingest. A
volatile default (clock_timestamp(), random()) would rewrite the table, and give each existing row
its own value. The existing requests get the migration's time as created_at, later than their
touched_at: a drift remediation the previous release's sweep asked for is taken as asked for by
someone else, and recomputes as before even outside the rollout stage (not withdrawn). A request
inserted afterwards has created_at = touched_at, the sweep's alone."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from app.db import make_engine
from app.migrate import upgrade
from app.policy_file import load_policy
from app.recompute.service import run_recompute
from tests.integration.migration_setup import upgrade_to_before

TABLES = ("recompute_request", "stripe_subscription")


def _sql(engine: Engine, statement: str, **params: Any) -> list[Any]:
    with engine.begin() as conn:
        result = conn.exec_driver_sql(statement, params)
        return [tuple(r) for r in result] if result.returns_rows else []


def _files(engine: Engine) -> dict[str, int]:
    return dict(_sql(engine, "SELECT relname, relfilenode FROM pg_class WHERE relname = ANY(%(t)s)", t=list(TABLES)))


def test_the_columns_come_to_tables_full_of_rows_without_a_rewrite_and_old_requests_recompute(empty_database: str):
    url = empty_database
    upgrade_to_before(url, "request_created_at")
    engine = make_engine(url)
    try:
        _sql(engine, "INSERT INTO subs_account (account_id) VALUES ('acct_old_1'), ('acct_old_2')")
        # A drift remediation the previous release's sweep asked for, and one thousand other requests.
        _sql(engine, "INSERT INTO recompute_request (account_id, trigger, cause) "
                     "VALUES ('acct_old_1', 'DRIFT_DETECTED', 'drift_sweep:7')")
        _sql(engine, "INSERT INTO recompute_request (account_id, trigger, cause) "
                     "SELECT 'acct_many_' || g, 'PAYMENT_FAILED', 'evt_' || g FROM generate_series(1, 1000) g")
        _sql(engine, "INSERT INTO stripe_subscription (id, stripe_customer_id, status, products, source_created, "
                     "source_rank) SELECT 'sub_' || g, 'cus_' || g, 'active', '[]', 1, 0 "
                     "FROM generate_series(1, 1000) g")
        files = _files(engine)

        assert upgrade(url, "subscription_collection_paused") == []

        assert _files(engine) == files  # no table rewritten
        # One value for every existing request (the migration's now()), later than when it was asked for.
        assert _sql(engine, "SELECT count(*), count(DISTINCT created_at), bool_and(created_at > touched_at) "
                            "FROM recompute_request") == [(1001, 1, True)]
        assert _sql(engine, "SELECT collection_paused, count(*) FROM stripe_subscription GROUP BY 1") == [({}, 1000)]
        # Inserted from now on: created_at is touched_at (the same transaction's now()).
        _sql(engine, "INSERT INTO recompute_request (account_id, trigger, cause) "
                     "VALUES ('acct_old_2', 'DRIFT_DETECTED', 'drift_sweep:8')")
        assert _sql(engine, "SELECT created_at = touched_at FROM recompute_request "
                            "WHERE account_id = 'acct_old_2'") == [(True,)]

        upgrade(url)
        assert _sql(engine, "SELECT stage FROM rollout_state") == [("off",)]
        # The previous release's remediation runs as before though the rollout is off; the new one,
        # the sweep's alone, is withdrawn.
        policy = load_policy()
        assert run_recompute(engine, policy, "acct_old_1", "DRIFT_DETECTED", coalesced=True).outcome == "changed"
        assert run_recompute(engine, policy, "acct_old_2", "DRIFT_DETECTED", coalesced=True).outcome == \
            "out_of_stage"
    finally:
        engine.dispose()
