"""Migration card_expiry_reviews: a decision stored before card expiries were review moments gets one.

Found by an audit: subs_mandate said `expired` only once something recomputed the account after the
card's expiry month had ended; compute now stores the card's expiry as a review moment, but a
decision stored before has none. An account whose card already expired while stored `usable` is
reviewed once, now; one whose card expires later is reviewed then (unless an earlier review is
stored). Detached and expired mandates give no review.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, event

from app.db import make_engine
from app.migrate import upgrade
from app.policy_file import load_policy
from app.recompute.service import run_recompute
from tests.integration.migration_setup import due_reviews, upgrade_to_before

# The migration reads the database's now(), which no frozen clock moves: months around this run's.
TODAY = datetime.now(UTC)
LAST_MONTH = (TODAY.year, TODAY.month - 1) if TODAY.month > 1 else (TODAY.year - 1, 12)
NEXT_MONTH = (TODAY.year, TODAY.month + 1) if TODAY.month < 12 else (TODAY.year + 1, 1)
# A card of NEXT_MONTH is valid through it: expired from the first of the month after.
NEXT_MONTH_ENDS = datetime(NEXT_MONTH[0] + NEXT_MONTH[1] // 12, NEXT_MONTH[1] % 12 + 1, 1, tzinfo=UTC)
SOON = TODAY.replace(microsecond=0) + timedelta(days=1)


def _review(engine, account: str):
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT next_review_at FROM subs_dunning WHERE account_id = %(a)s",
                                    {"a": account}).scalar()


def test_stored_decisions_get_their_cards_expiry_as_a_review(empty_database: str):
    url = empty_database
    upgrade_to_before(url, "card_expiry_reviews")
    engine = make_engine(url)
    policy = load_policy()
    try:
        with engine.begin() as conn:
            # account: (its card's mandate status as stored, (exp year, month), mirror attached, review stored)
            for account, status, (year, month), attached, review in (
                    ("acct_expired", "usable", LAST_MONTH, True, None),
                    ("acct_blocked", "blocked", LAST_MONTH, True, None),
                    ("acct_later", "usable", NEXT_MONTH, True, None),
                    ("acct_reviewed_sooner", "usable", NEXT_MONTH, True, SOON),
                    ("acct_detached", "detached", LAST_MONTH, False, None),
                    ("acct_shown_expired", "expired", LAST_MONTH, True, None)):
                customer, card = f"cus_{account}", f"pm_{account}"
                conn.exec_driver_sql("INSERT INTO subs_account (account_id) VALUES (%(a)s)", {"a": account})
                conn.exec_driver_sql("INSERT INTO subs_customer (stripe_customer_id, account_id) "
                                     "VALUES (%(c)s, %(a)s)", {"c": customer, "a": account})
                conn.exec_driver_sql(
                    "INSERT INTO stripe_payment_method (id, stripe_customer_id, type, attached, exp_month, "
                    "exp_year, changed_at, source_created, source_rank) VALUES (%(p)s, %(c)s, 'card', "
                    "%(attached)s, %(m)s, %(y)s, now() - interval '400 days', 1, 1)",
                    {"p": card, "c": customer, "attached": attached, "m": month, "y": year})
                # As the code before card expiries were review moments stored it: current, no review
                # (or one stored for another reason), the card's mandate as it was then.
                conn.exec_driver_sql("INSERT INTO subs_dunning (account_id, status, level, version, next_review_at) "
                                     "VALUES (%(a)s, 'current', 'none', 1, %(r)s)", {"a": account, "r": review})
                conn.exec_driver_sql(
                    "INSERT INTO subs_mandate (payment_method_id, account_id, status, exp_month, exp_year) "
                    "VALUES (%(p)s, %(a)s, %(s)s, %(m)s, %(y)s)",
                    {"p": card, "a": account, "s": status, "m": month, "y": year})
        assert due_reviews(engine, TODAY + timedelta(days=400)) == ["acct_reviewed_sooner"]  # nobody else, ever

        upgrade(url)
        assert due_reviews(engine, datetime.now(UTC)) == ["acct_blocked", "acct_expired"]  # once, at once
        assert _review(engine, "acct_later") == NEXT_MONTH_ENDS
        assert _review(engine, "acct_reviewed_sooner") == SOON
        assert _review(engine, "acct_detached") is None and _review(engine, "acct_shown_expired") is None

        for account in ("acct_expired", "acct_blocked"):
            run_recompute(engine, policy, account, "STATE_REFRESH")
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SELECT status FROM subs_mandate WHERE account_id = %(a)s",
                                            {"a": account}).scalar() == "expired"
            assert _review(engine, account) is None  # no card left to expire: nothing due again
        run_recompute(engine, policy, "acct_later", "STATE_REFRESH")
        assert _review(engine, "acct_later") == NEXT_MONTH_ENDS  # what compute stores itself
    finally:
        engine.dispose()


def test_each_batch_reads_its_own_accounts_not_every_stored_decision(empty_database: str):
    """The migration goes through subs_dunning in batches of accounts, each its own transaction. A
    batch whose plan reads subs_dunning whole (its accounts' bounds unknown when planned, estimated at
    a ninth of the table: a hash join over every row) costs the table's size, so the migration costs
    the table's size times the number of batches: 90 s at 1,000,000 accounts (201 batches, each
    reading 1,000,000 rows), and four times that for twice the accounts. Every statement of the
    migration that updates subs_dunning reads it by its index, at production's shape: many more
    accounts than a batch, analysed as autovacuum would."""
    url = empty_database
    upgrade(url, "periodic_scans")
    engine = make_engine(url)
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if "UPDATE subs_dunning" in statement:
            statements.append((statement, parameters))

    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO subs_account (account_id) "
                "SELECT 'acct_' || lpad(g::text, 6, '0') FROM generate_series(1, 60000) g")
            conn.exec_driver_sql(
                "INSERT INTO subs_dunning (account_id, status, level, version) "
                "SELECT 'acct_' || lpad(g::text, 6, '0'), 'current', 'none', 1 FROM generate_series(1, 60000) g")
            conn.exec_driver_sql(
                "INSERT INTO subs_mandate (payment_method_id, account_id, status, exp_month, exp_year) "
                "SELECT 'pm_' || g, 'acct_' || lpad((mod(g, 60000) + 1)::text, 6, '0'), 'usable', "
                "       1 + mod(g, 12), %(year)s + mod(g, 5) FROM generate_series(1, 72000) g",
                {"year": TODAY.year - 1})
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")
        event.listen(Engine, "before_cursor_execute", capture)
        try:
            upgrade(url, "card_expiry_reviews")
        finally:
            event.remove(Engine, "before_cursor_execute", capture)
        assert len(statements) >= 12  # the batches
        for statement, parameters in statements:
            with engine.begin() as conn:
                plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + statement, parameters))
            assert "Seq Scan on subs_dunning" not in plan, plan
        with engine.connect() as conn:
            reviewed = conn.exec_driver_sql("SELECT count(next_review_at) FROM subs_dunning").scalar()
        assert reviewed == 60000  # each account has a card: every batch did its part
    finally:
        engine.dispose()
