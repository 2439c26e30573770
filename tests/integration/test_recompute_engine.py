"""The recompute engine against the real database: minimal diff, no-op recomputes, query count."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import psycopg2
from sqlalchemy import event as sa_event

from app.db import KEYED_PLANS
from app.recompute.service import AccountNotFound, run_recompute
from tests.conftest import Accounts, post_event
from tests.stripe_events import event, unique


def _row_version(engine, account: str) -> tuple[str, int]:
    with engine.connect() as conn:
        xmin, version = conn.exec_driver_sql(
            "SELECT xmin::text, version FROM subs_dunning WHERE account_id = %(a)s", {"a": account}).one()
    return xmin, version


def _outbox(engine, account: str) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.exec_driver_sql(
            "SELECT event_type FROM outbox WHERE account_id = %(a)s ORDER BY id", {"a": account})]


def test_recompute_equal_to_stored_performs_no_update_and_emits_nothing(client, accounts: Accounts, runtime, engine):
    account, customer = accounts.create()
    post_event(client, event("invoice.payment_failed", customer=customer))
    now = datetime.now(UTC)
    first = run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED", now)
    assert first.outcome == "changed"
    events_after_first = _outbox(engine, account)
    assert events_after_first == ["DunningEntered", "ConsequenceEscalated", "EntitlementsChanged"]
    xmin, version = _row_version(engine, account)

    second = run_recompute(engine, runtime.policy, account, "NINJAPANEL_BUTTON", now + timedelta(seconds=1))
    assert second.outcome == "unchanged" and second.applied is not None and second.applied.changed_fields == []
    # xmin changes with any UPDATE of the row, even one writing the same values.
    assert _row_version(engine, account) == (xmin, version)
    assert _outbox(engine, account) == events_after_first


def test_apply_writes_only_the_changed_columns(client, accounts: Accounts, runtime, engine):
    account, customer = accounts.create()
    invoice = unique("in")
    created = int(time.time())
    post_event(client, event("invoice.payment_failed", id=invoice, customer=customer, created=created))
    now = datetime.now(UTC)
    run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED", now)
    statements: list[str] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    sa_event.listen(engine, "before_cursor_execute", capture)
    try:
        # Eight days later the level escalates: only the columns that differ are written.
        later = run_recompute(engine, runtime.policy, account, "DRIFT_DETECTED", now + timedelta(days=8))
    finally:
        sa_event.remove(engine, "before_cursor_execute", capture)
    assert later.applied is not None
    # Status, failure class, outstanding amount... are unchanged and not written.
    # (next_review_at moves on to the next level's threshold)
    assert set(later.applied.changed_fields) == {"level", "reasons", "next_review_at"}
    update = next(s for s in statements if s.startswith("UPDATE subs_dunning"))
    assert "level =" in update and "reasons =" in update
    assert "status =" not in update and "failure_class =" not in update and "entitlements =" not in update
    assert _outbox(engine, account)[-1] == "ConsequenceEscalated"


class CountingCursor(psycopg2.extensions.cursor):
    """Counts every statement sent through the driver, whoever sends it."""

    sent: list[str] = []

    def execute(self, query, vars=None):
        CountingCursor.sent.append(query if isinstance(query, str) else query.decode())
        return super().execute(query, vars)


def test_gather_takes_a_fixed_number_of_statements_whatever_the_history(client, accounts: Accounts, runtime,
                                                                        database_url):
    from app.db import make_engine

    account, customer = accounts.create()
    base = int(time.time()) - 400 * 86400
    for month in range(24):  # two years of invoices, each failed once then paid
        inv = unique("in")
        at = base + month * 86400 * 30
        post_event(client, event("invoice.payment_failed", id=inv, customer=customer, created=at))
        post_event(client, event("invoice.paid", id=inv, customer=customer, created=at + 3600))
    counting = make_engine(database_url, connect_args={"connect_timeout": 3, "cursor_factory": CountingCursor})
    try:
        run_recompute(counting, runtime.policy, account, "MANUAL", datetime.now(UTC))  # prepares on this connection
        CountingCursor.sent.clear()
        result = run_recompute(counting, runtime.policy, account, "MANUAL", datetime.now(UTC))
    finally:
        counting.dispose()
    # Round trip 1: lock + take the pending request (two statements sent together).
    # Round trip 2: gather, one prepared statement. Nothing changed, so no write.
    reads = [s for s in CountingCursor.sent if not s.lstrip().upper().startswith(("INSERT", "UPDATE"))]
    assert len(reads) == 2, reads
    assert "pg_advisory_xact_lock" in reads[0] and "DELETE FROM recompute_request" in reads[0]
    assert "EXECUTE dunning_gather" in reads[1]
    assert result.outcome == "unchanged" and result.decision is not None and len(result.decision.assessments) == 0


def test_unknown_account_is_bad_data(engine, runtime, clean):
    try:
        run_recompute(engine, runtime.policy, "acct_missing", "MANUAL", datetime.now(UTC))
    except AccountNotFound as exc:
        assert "acct_missing" in str(exc)
    else:
        raise AssertionError("expected AccountNotFound")


def test_bad_debt_flag_on_subs_account_mirrors_status(client, accounts: Accounts, runtime, engine):
    account, customer = accounts.create()
    invoice = unique("in")
    post_event(client, event("invoice.marked_uncollectible", id=invoice, customer=customer,
                             amount_remaining=5000, amount_due=5000))
    run_recompute(engine, runtime.policy, account, "MARKED_UNCOLLECTIBLE", datetime.now(UTC))
    with engine.connect() as conn:
        flag = conn.exec_driver_sql("SELECT bad_debt FROM subs_account WHERE account_id = %(a)s", {"a": account})
        assert flag.scalar_one() is True
        episode = conn.exec_driver_sql("SELECT reason, exited_at FROM bad_debt_episode WHERE account_id = %(a)s",
                                       {"a": account}).one()
    assert episode.reason == "marked_uncollectible" and episode.exited_at is None
    post_event(client, event("invoice.paid", id=invoice, customer=customer, created=int(time.time()) + 10))
    result = run_recompute(engine, runtime.policy, account, "STATE_REFRESH", datetime.now(UTC))
    assert result.applied is not None and result.applied.episode == "closed"
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT bad_debt FROM subs_account WHERE account_id = %(a)s",
                                    {"a": account}).scalar_one() is False
        how = conn.exec_driver_sql("SELECT exit_how FROM bad_debt_episode WHERE account_id = %(a)s",
                                   {"a": account}).scalar_one()
    assert how == "paid"
    assert "BadDebtExited" in _outbox(engine, account)


def test_gather_stays_a_keyed_lookup_after_the_tables_grow(accounts: Accounts, runtime, database_url):
    """The plan is cached per connection; made while subs_dunning was nearly empty it once became a
    full scan of it on every recompute. It must stay keyed however the table grows afterwards."""
    from app.db import make_engine

    account, _ = accounts.create()
    engine = make_engine(database_url, pool_size=1, max_overflow=0)
    try:
        run_recompute(engine, runtime.policy, account, "MANUAL", datetime.now(UTC))  # prepares, tables tiny
        with engine.begin() as conn:
            for table in ("subs_account", "subs_dunning"):
                conn.exec_driver_sql(f"INSERT INTO {table} (account_id) "
                                     "SELECT 'grow_' || g FROM generate_series(1, 3000) g")
        with engine.begin() as conn:  # the same pooled connection, so the same cached plan
            conn.exec_driver_sql(KEYED_PLANS)
            plan = [r[0] for r in conn.exec_driver_sql("EXPLAIN (ANALYZE) EXECUTE dunning_gather(%(ids)s)",
                                                       {"ids": ["grow_2999"]})]
    finally:
        engine.dispose()
    dunning_scans = [line for line in plan if "on subs_dunning" in line]
    assert dunning_scans, plan
    assert all("rows=1 loops=1" in line or "rows=0 loops=1" in line for line in dunning_scans), dunning_scans
    assert not any("Seq Scan" in line for line in plan), plan
