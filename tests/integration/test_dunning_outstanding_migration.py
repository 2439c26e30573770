"""Migration dunning_outstanding: decisions stored before amounts were kept per currency.

A row owing money whose account is billed in one currency owes its outstanding_amount in that
currency (filled in); one billed in several is not known until its next recompute, which beat runs at
once (due for review); a row owing nothing owes nothing. A row not known yet is no drift, and a row
owing nothing is rewritten by no recompute.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app import queries
from app.db import make_engine
from app.domain.compute import compute
from app.domain.drift import drift_of
from app.migrate import upgrade
from app.policy_file import load_policy
from app.recompute.gather import gather
from app.recompute.service import run_recompute
from tests.integration.migration_setup import due_reviews, upgrade_to_before

AT = datetime.now(UTC).replace(microsecond=0) - timedelta(days=5)


def _row(engine, account: str):
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT outstanding, outstanding_amount FROM subs_dunning "
                                    "WHERE account_id = %(a)s", {"a": account}).one()


def test_rows_stored_before_are_filled_in_in_one_currency_and_reviewed_in_several(empty_database: str):
    url = empty_database
    upgrade_to_before(url, "dunning_outstanding")
    engine = make_engine(url)
    policy = load_policy()
    try:
        with engine.begin() as conn:
            for account, invoices, amount in (
                    ("acct_one", [("usd", 1000), ("usd", 500)], 1500),
                    ("acct_two", [("usd", 1000), ("eur", 1000)], 2000),
                    ("acct_none", [("eur", 0)], 0)):
                customer = account.replace("acct", "cus")
                conn.exec_driver_sql("INSERT INTO subs_account (account_id) VALUES (%(a)s)", {"a": account})
                conn.exec_driver_sql("INSERT INTO subs_customer (stripe_customer_id, account_id) "
                                     "VALUES (%(c)s, %(a)s)", {"c": customer, "a": account})
                for n, (currency, remaining) in enumerate(invoices):
                    conn.exec_driver_sql(
                        "INSERT INTO stripe_invoice (id, stripe_customer_id, status, amount_due, amount_remaining, "
                        "currency, created, first_failed_at, lines, source_created, source_rank, source_event_id) "
                        "VALUES (%(i)s, %(c)s, %(s)s, 1000, %(r)s, %(cur)s, %(at)s, %(at)s, "
                        "'[{\"product\": \"prod_core\", \"amount\": 1000}]', 1, 1, 'evt_1')",
                        {"i": f"in_{account}_{n}", "c": customer, "s": "open" if remaining else "paid",
                         "r": remaining, "cur": currency, "at": AT})
                conn.exec_driver_sql(
                    "INSERT INTO subs_dunning (account_id, status, level, outstanding_amount, version) "
                    "VALUES (%(a)s, %(s)s, %(l)s, %(o)s, 1)",
                    {"a": account, "s": "past_due" if amount else "current", "l": "notice" if amount else "none",
                     "o": amount})

        upgrade(url)
        assert _row(engine, "acct_one") == ([{"currency": "usd", "amount": 1500}], 1500)
        assert _row(engine, "acct_two") == (None, 2000)
        assert _row(engine, "acct_none") == (None, 0)
        assert due_reviews(engine, datetime.now(UTC)) == ["acct_two"]  # once, at once

        with engine.connect() as conn:
            two = queries.dunning_view(conn, "acct_two")
            none = queries.dunning_view(conn, "acct_none")
        assert two is not None and none is not None
        assert two["outstanding"] is None and two["outstanding_amount"] is None  # never the sum shown
        assert "not known yet" in two["outstanding_amount_reason"]
        assert (none["outstanding"], none["outstanding_amount"]) == ([], 0)

        run_recompute(engine, policy, "acct_two", "STATE_REFRESH")
        assert _row(engine, "acct_two") == ([{"currency": "eur", "amount": 1000},
                                             {"currency": "usd", "amount": 1000}], 2000)

        # Not known is no drift for the sweep; nothing owed and nothing stored is no change to write.
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE subs_dunning SET outstanding = NULL WHERE account_id = 'acct_two'")
        with engine.connect() as conn:
            gathered = gather(conn, "acct_two")
        assert gathered is not None
        assert drift_of(gathered[0], compute(gathered[0], policy, datetime.now(UTC))) is None
        run_recompute(engine, policy, "acct_none", "STATE_REFRESH")  # writes its state as compute has it
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE subs_dunning SET outstanding = NULL WHERE account_id = 'acct_none'")
        assert run_recompute(engine, policy, "acct_none", "STATE_REFRESH").outcome == "unchanged"
    finally:
        engine.dispose()
