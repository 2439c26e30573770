"""The periodic statements stay off the tables that only grow: their plans at production's shape.

Each test fills a table with the history a long-lived fleet holds (payment_retry is never pruned;
subs_dunning holds a row per account), analyses it as autovacuum would, and reads the statement's
plan. A sequential scan there reads the whole table on every beat tick or /metrics scrape, however
few rows the statement is about (bench/periodic.py measures them at millions of rows).
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from app.metrics_db import GAUGES_SQL
from app.payments.retries import UNSENT_SQL, UNSENT_TOO_LONG_SQL
from app.sweep.lifting import COUNT_SQL, STUCK_LIFTING_SQL


def plan(engine, sql: str, params: dict) -> str:
    with engine.begin() as conn:
        return "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql, params))


@pytest.fixture
def retry_history(engine, clean):
    """30,000 retries charged long ago (the history of every invoice ever retried) and two claimed
    now, one of them never sent."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO payment_retry (account_id, invoice_id, payment_method_id, retry_number, idempotency_key, "
            "                           scheduled_for, state, created_at, updated_at) "
            "SELECT 'acct_' || mod(g, 5000), 'in_' || g, 'pm_' || g, 1, 'retry:in_' || g, "
            "       now() - make_interval(hours => g), CASE WHEN mod(g, 3) = 0 THEN 'failed' ELSE 'sent' END, "
            "       now() - make_interval(hours => g), now() - make_interval(hours => g) "
            "  FROM generate_series(1, 30000) g")
        conn.exec_driver_sql(
            "INSERT INTO payment_retry (account_id, invoice_id, payment_method_id, retry_number, idempotency_key, "
            "                           scheduled_for, state, created_at, updated_at) VALUES "
            "('acct_new', 'in_new', 'pm_new', 1, 'retry:in_new', now(), 'dispatched', now() - interval '5 minutes', "
            " now() - interval '5 minutes'), "
            "('acct_old', 'in_old', 'pm_old', 1, 'retry:in_old', now(), 'dispatched', now() - interval '2 hours', "
            " now() - interval '2 hours')")
        conn.exec_driver_sql("ANALYZE payment_retry")


def test_the_dispatch_finds_claimed_retries_never_sent_without_reading_the_retry_history(engine, retry_history):
    """tasks.dispatch_due_retries (every 30 s) looks for claimed retries whose message may be lost and
    for those never sent within the guard window. payment_retry is never pruned: both statements read
    every retry ever made (300 ms a tick at 2 million rows, 10 s, the statement timeout, at about 60
    million, when no retry would be dispatched any more). Only the claimed ones (state dispatched) are
    read now."""
    now = datetime.now(UTC)
    unsent = plan(engine, UNSENT_SQL, {"now": now, "stale": 120, "guard": 30, "limit": 500})
    too_long = plan(engine, UNSENT_TOO_LONG_SQL, {"now": now, "guard": 30, "limit": 500})
    assert "Seq Scan on payment_retry" not in unsent, unsent
    assert "Seq Scan on payment_retry" not in too_long, too_long
    assert "ix_payment_retry_dispatched" in unsent and "ix_payment_retry_dispatched" in too_long


def test_the_claimed_retries_are_still_found(engine, retry_history):
    """The same rows as before the index: the one claimed 5 minutes ago is sent again, the one claimed
    2 hours ago is past the guard window (its account recomputed)."""
    now = datetime.now(UTC)
    with engine.begin() as conn:
        unsent = conn.exec_driver_sql(UNSENT_SQL, {"now": now, "stale": 120, "guard": 30, "limit": 500}).fetchall()
        ids = {r[0] for r in unsent}
        (new_id,) = conn.exec_driver_sql("SELECT id FROM payment_retry WHERE idempotency_key = 'retry:in_new'").one()
        too_long = conn.exec_driver_sql(UNSENT_TOO_LONG_SQL, {"now": now, "guard": 30, "limit": 500}).fetchall()
    assert ids == {new_id}
    assert [r[0] for r in too_long] == ["acct_old"]


@pytest.fixture
def many_accounts(engine, clean):
    """20,000 accounts, three of them lifting (one for two hours: stuck past the guard window)."""
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO subs_account (account_id) "
                             "SELECT 'acct_' || lpad(g::text, 6, '0') FROM generate_series(1, 20000) g")
        conn.exec_driver_sql(
            "INSERT INTO subs_dunning (account_id, status, level, changed_at) "
            "SELECT 'acct_' || lpad(g::text, 6, '0'), CASE WHEN g <= 3 THEN 'lifting' ELSE 'current' END, 'none', "
            "       CASE WHEN g = 1 THEN now() - interval '2 hours' ELSE now() END "
            "  FROM generate_series(1, 20000) g")
        conn.exec_driver_sql("ANALYZE subs_dunning")


def test_the_stuck_in_lifting_gauge_does_not_read_every_account(engine, many_accounts):
    """Every /metrics scrape (of every web and worker replica) counts the accounts lifting past the
    guard window: it read all of subs_dunning, a row per account (110 MB a scrape at 600,000 accounts,
    growing with the customer base), for the few accounts with a payment in flight. /ops/lifting and
    /support/lifting read the same accounts."""
    before = datetime.now(UTC)
    for sql, params in ((GAUGES_SQL, {"guard": 30}), (STUCK_LIFTING_SQL, {"before": before, "limit": 100}),
                        (COUNT_SQL, {"before": before})):
        p = plan(engine, sql, params)
        assert "Seq Scan on subs_dunning" not in p, p
        assert "ix_subs_dunning_lifting" in p, p


def test_the_stuck_in_lifting_gauge_still_counts_them(engine, many_accounts):
    from app import metrics
    from app.metrics_db import refresh

    refresh(engine, 30)
    assert metrics.STUCK_IN_LIFTING._value.get() == 1
