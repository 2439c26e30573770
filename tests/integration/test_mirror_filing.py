"""Filing Stripe mirror rows under an account (migration mirror_account_key, app/sweep/refile.py).

The invariant the sweep relies on: a mirror_customer row (customer, K) means every mirror row of
that customer carries account_key K. These tests hold it where it is easiest to break: a refile
racing a mirror writer, in both orders, on two real connections.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from app.embedded import poll_until
from app.sweep.refile import refile_customers
from tests.conftest import Accounts
from tests.integration.migration_setup import upgrade_to_before


def invoice(conn: Any, invoice_id: str, customer: str, subscription: str | None = None) -> None:
    conn.exec_driver_sql(
        "INSERT INTO stripe_invoice (id, stripe_customer_id, subscription_id, status, created, source_created, "
        "source_rank, source_event_id) VALUES (%(id)s, %(c)s, %(s)s, 'open', now(), 1, 1, 'evt_file')",
        {"id": invoice_id, "c": customer, "s": subscription})


def keys(engine: Engine, customer: str) -> tuple[Any, list[Any]]:
    with engine.connect() as conn:
        filed = conn.exec_driver_sql("SELECT account_key FROM mirror_customer WHERE stripe_customer_id = %(c)s",
                                     {"c": customer}).scalar_one_or_none()
        rows = list(conn.exec_driver_sql("SELECT DISTINCT account_key FROM stripe_invoice "
                                         "WHERE stripe_customer_id = %(c)s", {"c": customer}).scalars())
    return filed, rows


def waiting_on_a_lock(engine: Engine, query_start: str) -> bool:
    with engine.connect() as conn:
        return bool(conn.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %(q)s",
            {"q": query_start + "%"}).scalar_one())


def move(engine: Engine, customer: str, account: str) -> None:
    """What another team does to subs_customer."""
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE subs_customer SET account_id = %(a)s WHERE stripe_customer_id = %(c)s",
                             {"a": account, "c": customer})


def test_a_mirror_row_is_filed_under_the_account_of_its_customer(accounts: Accounts, engine: Engine):
    account, customer = accounts.create()
    with engine.begin() as conn:
        invoice(conn, "in_file_1", customer)
        invoice(conn, "in_file_2", "cus_file_nobody")  # a customer no account maps (yet)
    assert keys(engine, customer) == (account, [account])
    assert keys(engine, "cus_file_nobody") == (None, [None])


def test_a_refile_waits_for_a_writer_in_flight_and_moves_its_row(accounts: Accounts, engine: Engine):
    old, customer = accounts.create()
    new, _ = accounts.create()
    with engine.begin() as conn:
        invoice(conn, "in_file_a", customer)
    assert keys(engine, customer) == (old, [old])
    writer = engine.connect()
    writer.begin()
    invoice(writer, "in_file_b", customer)  # filed under the old account, not committed yet
    move(engine, customer, new)
    filed: list[int] = []
    refile = threading.Thread(target=lambda: filed.append(refile_customers(engine).filed))
    refile.start()
    try:
        assert poll_until(lambda: waiting_on_a_lock(engine, "LOCK TABLE mirror_customer"), timeout=10)
    finally:
        writer.commit()
        writer.close()
        refile.join(timeout=10)
    assert filed and filed[0] >= 1
    assert keys(engine, customer) == (new, [new])  # the row written during the refile moved too


def test_a_writer_waits_for_a_refile_in_progress_and_files_under_the_new_account(accounts: Accounts, engine: Engine):
    old, customer = accounts.create()
    new, _ = accounts.create()
    with engine.begin() as conn:
        invoice(conn, "in_file_c", customer)
    move(engine, customer, new)
    assert keys(engine, customer) == (old, [old])  # filed under the account it had
    refiling = engine.connect()
    refiling.begin()
    refiling.exec_driver_sql("LOCK TABLE mirror_customer IN SHARE ROW EXCLUSIVE MODE")
    refiling.exec_driver_sql("UPDATE stripe_invoice SET account_key = %(a)s WHERE stripe_customer_id = %(c)s",
                             {"a": new, "c": customer})
    refiling.exec_driver_sql("UPDATE mirror_customer SET account_key = %(a)s WHERE stripe_customer_id = %(c)s",
                             {"a": new, "c": customer})
    errors: list[BaseException] = []

    def write() -> None:
        try:
            with engine.begin() as conn:
                invoice(conn, "in_file_d", customer)
        except BaseException as exc:  # reported below
            errors.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert poll_until(lambda: waiting_on_a_lock(engine, "INSERT INTO stripe_invoice"), timeout=10)
    finally:
        refiling.commit()
        refiling.close()
        writer.join(timeout=10)
    assert not errors
    assert keys(engine, customer) == (new, [new])
    assert refile_customers(engine).filed >= 0 and keys(engine, customer) == (new, [new])


def test_the_filing_trigger_refuses_a_writer_that_would_read_a_stale_key(accounts: Accounts, engine: Engine):
    _, customer = accounts.create()
    with pytest.raises(DBAPIError, match="READ COMMITTED"), engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            invoice(conn, "in_file_rr", customer)
    assert keys(engine, customer) == (None, [])


def test_the_migration_files_what_was_mirrored_before_it_and_goes_back_down(empty_database: str):
    from sqlalchemy import create_engine

    from app.migrate import downgrade, upgrade

    url = empty_database
    upgrade(url, "sweep_counts_and_gate")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO subs_account (account_id) VALUES ('acct_m1'), ('acct_m2')")
            conn.exec_driver_sql("INSERT INTO subs_customer (stripe_customer_id, account_id) "
                                 "VALUES ('cus_m1', 'acct_m1'), ('cus_m2', 'acct_m2')")
            invoice(conn, "in_m1", "cus_m1")
            invoice(conn, "in_m0", "cus_m0")  # mirrored, but no account maps its customer
        upgrade(url)
        with engine.connect() as conn:
            filed: dict[str, Any] = dict(
                conn.exec_driver_sql("SELECT stripe_customer_id, account_key FROM mirror_customer").all())
            rows: dict[str, Any] = dict(conn.exec_driver_sql("SELECT id, account_key FROM stripe_invoice").all())
        assert filed == {"cus_m1": "acct_m1", "cus_m2": "acct_m2", "cus_m0": None}
        assert rows == {"in_m1": "acct_m1", "in_m0": None}
        downgrade(url, "sweep_counts_and_gate")
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT to_regclass('mirror_customer')").scalar_one() is None
        upgrade(url)
    finally:
        engine.dispose()


def test_the_failed_at_migration_keeps_the_time_of_failures_without_a_charge(empty_database: str):
    """attempt_failed_at: a failure that names no charge was timed by attempted_at; it keeps that time,
    from then on fixed. A failed authentication beside earlier charges gets it too (it was timed by
    the earlier charge: never announced); a charge's failure, or a bank debit's read as chargeless
    beside its own charge, stays timed by its charges."""
    from sqlalchemy import create_engine

    from app.migrate import downgrade, upgrade

    url = empty_database
    before = upgrade_to_before(url, "attempt_failed_at")
    engine = create_engine(url)
    rows = {  # id: (status, charge_id, failure_code, charges)
        "pi_3ds": ("failed", None, "payment_intent_authentication_failure", {}),
        "pi_3ds_reused": ("failed", None, "payment_intent_authentication_failure", {"ch_1": {"pm": None, "at": 1}}),
        "pi_debit": ("failed", None, "debit_not_authorized", {"py_1": {"pm": None, "at": 1}}),
        "pi_declined": ("failed", "ch_2", "card_declined", {"ch_2": {"pm": None, "at": 1}}),
        "pi_paid": ("succeeded", None, None, {}),
    }
    try:
        with engine.begin() as conn:
            for pi, (status, charge, code, charges) in rows.items():
                conn.exec_driver_sql(
                    "INSERT INTO stripe_payment_attempt (id, status, charge_id, failure_code, charges, attempted_at, "
                    "source_created, source_rank) VALUES (%(id)s, %(s)s, %(ch)s, %(f)s, %(c)s::jsonb, "
                    "'2026-11-20T10:00:00+00:00', 1, 1)",
                    {"id": pi, "s": status, "ch": charge, "f": code, "c": json.dumps(charges)})
        upgrade(url)
        with engine.connect() as conn:
            failed_at: dict[str, Any] = dict(conn.exec_driver_sql(
                "SELECT id, failed_at FROM stripe_payment_attempt WHERE failed_at IS NOT NULL").all())
        at = datetime(2026, 11, 20, 10, tzinfo=UTC)
        assert failed_at == {"pi_3ds": at, "pi_3ds_reused": at}
        downgrade(url, before)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM information_schema.columns WHERE "
                                        "table_name = 'stripe_payment_attempt' AND column_name = 'failed_at'"
                                        ).scalar_one() == 0
        upgrade(url)
    finally:
        engine.dispose()


def test_the_chargeless_facts_migration_keeps_what_existing_failures_show_and_goes_back_down(empty_database: str):
    """attempt_chargeless_facts: an attempt whose outcome is a failure that made no charge gets the
    charge its row knows as the latest (by time, then id) and the card it shows; every other row,
    a failure made before a later charge's outcome included, none. The downgrade drops both."""
    from sqlalchemy import create_engine

    from app.migrate import downgrade, upgrade

    url = empty_database
    before = upgrade_to_before(url, "attempt_chargeless_facts")
    engine = create_engine(url)
    at = "2026-11-20T10:00:00+00:00"
    rows = {  # id: (status, charge_id, payment_method_id, failed_at, charges)
        "pi_3ds_first": ("failed", None, "pm_a", at, {}),
        "pi_3ds_reused": ("failed", None, "pm_b", at,
                          {"ch_1": {"pm": "pm_x", "at": 9}, "ch_3": {"pm": "pm_x", "at": 5},
                           "ch_2": {"pm": "pm_x", "at": 9}}),
        "pi_declined_after": ("failed", "ch_4", "pm_c", at, {"ch_4": {"pm": "pm_c", "at": 7}}),
        "pi_paid_after": ("succeeded", "ch_5", "pm_d", at, {"ch_5": {"pm": "pm_d", "at": 7}}),
        "pi_cancelled": ("failed", None, "pm_e", None, {}),
    }
    columns = ("SELECT count(*) FROM information_schema.columns WHERE table_name = 'stripe_payment_attempt' "
               "AND column_name IN ('failed_after_charge', 'failed_method')")
    try:
        with engine.begin() as conn:
            for pi, (status, charge, method, failed_at, charges) in rows.items():
                conn.exec_driver_sql(
                    "INSERT INTO stripe_payment_attempt (id, status, charge_id, payment_method_id, failed_at, charges, "
                    "attempted_at, source_created, source_rank) VALUES (%(id)s, %(s)s, %(ch)s, %(pm)s, %(f)s, "
                    "%(c)s::jsonb, %(at)s, 1, 1)",
                    {"id": pi, "s": status, "ch": charge, "pm": method, "f": failed_at, "c": json.dumps(charges),
                     "at": at})
        upgrade(url)
        with engine.connect() as conn:
            facts = {r[0]: (r[1], r[2]) for r in conn.exec_driver_sql(
                "SELECT id, failed_after_charge, failed_method FROM stripe_payment_attempt").all()}
        assert facts == {"pi_3ds_first": (None, "pm_a"), "pi_3ds_reused": ("ch_2", "pm_b"),
                         "pi_declined_after": (None, None), "pi_paid_after": (None, None),
                         "pi_cancelled": (None, None)}
        downgrade(url, before)
        with engine.connect() as conn:
            assert conn.exec_driver_sql(columns).scalar_one() == 0
        upgrade(url)
        with engine.connect() as conn:
            assert conn.exec_driver_sql(columns).scalar_one() == 2
    finally:
        engine.dispose()


def _invoice_event(event_id: str, invoice_id: str, has_more: bool) -> str:
    """The raw body of an invoice event carrying the invoice's lines, with ``has_more``."""
    from tests.stripe_events import event

    evt = event("invoice.payment_failed", event_id=event_id, id=invoice_id, paths={"lines.has_more": has_more})
    return json.dumps(evt, indent=2)  # as Stripe sends it: "has_more": true over whitespace


def test_the_invoice_lines_migration_marks_the_debt_whose_latest_event_carried_first_lines_only(empty_database: str):
    """invoice_lines_incomplete: an open or uncollectible invoice whose stored row came from an event
    saying lines.has_more is marked incomplete (beat fetches its whole list); not one whose latest
    event carried them all although an earlier one did not, nor a paid one, nor one whose body says
    has_more elsewhere only. The backfill reads the events without holding stripe_invoice's
    exclusive lock (every webhook and every recompute reads stripe_invoice: held while the raw
    bodies were read, they waited for it, the webhooks past their lock timeout). The downgrade drops
    both columns and the index."""
    from sqlalchemy import create_engine, event

    from app.migrate import downgrade, upgrade

    url = empty_database
    before = upgrade_to_before(url, "invoice_lines_incomplete")
    engine = create_engine(url)
    other_line = json.loads(_invoice_event("evt_x", "in_x", False))
    other_line["data"]["object"]["discounts"] = {"object": "list", "data": [], "has_more": True}
    bodies = {  # event id: raw body
        "evt_open_more": _invoice_event("evt_open_more", "in_open_more", True),
        "evt_uncollectible_more": _invoice_event("evt_uncollectible_more", "in_uncollectible_more", True),
        "evt_earlier_more": _invoice_event("evt_earlier_more", "in_whole_at_last", True),
        "evt_latest_whole": _invoice_event("evt_latest_whole", "in_whole_at_last", False),
        "evt_paid_more": _invoice_event("evt_paid_more", "in_paid_more", True),
        "evt_elsewhere": json.dumps(other_line),
        "evt_nan": _invoice_event("evt_nan", "in_nan", True).replace('"amount_due": 1000', '"amount_due": NaN'),
    }
    invoices = {  # id: (status, the event its row came from)
        "in_open_more": ("open", "evt_open_more"),
        "in_uncollectible_more": ("uncollectible", "evt_uncollectible_more"),
        "in_whole_at_last": ("open", "evt_latest_whole"),
        "in_paid_more": ("paid", "evt_paid_more"),
        "in_elsewhere": ("open", "evt_elsewhere"),
        "in_nan": ("open", "evt_nan"),
    }
    locked = []

    def held_exclusively(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "has_more" in statement:  # the backfill reading the events: is stripe_invoice locked meanwhile?
            with engine.connect() as probe:
                locked.append(probe.exec_driver_sql(
                    "SELECT count(*) FROM pg_locks WHERE relation = 'stripe_invoice'::regclass "
                    "AND mode = 'AccessExclusiveLock' AND granted").scalar_one())

    columns = ("SELECT count(*) FROM information_schema.columns WHERE table_name = 'stripe_invoice' "
               "AND column_name IN ('lines_incomplete', 'lines_asked_at')")
    try:
        with engine.begin() as conn:
            for eid, body in bodies.items():
                conn.exec_driver_sql(
                    "INSERT INTO stripe_event (id, type, stripe_created, state, raw_body) "
                    "VALUES (%(id)s, 'invoice.payment_failed', 1, 'accepted', %(b)s)", {"id": eid, "b": body})
            for iid, (status, eid) in invoices.items():
                conn.exec_driver_sql(
                    "INSERT INTO stripe_invoice (id, stripe_customer_id, status, created, source_created, source_rank, "
                    "source_event_id) VALUES (%(id)s, 'cus_1', %(s)s, now(), 1, 1, %(e)s)",
                    {"id": iid, "s": status, "e": eid})
        event.listen(Engine, "before_cursor_execute", held_exclusively)
        try:
            upgrade(url)
        finally:
            event.remove(Engine, "before_cursor_execute", held_exclusively)
        with engine.connect() as conn:
            marked = {r[0] for r in conn.exec_driver_sql(
                "SELECT id FROM stripe_invoice WHERE lines_incomplete AND lines_asked_at IS NULL").all()}
        assert marked == {"in_open_more", "in_uncollectible_more", "in_nan"}
        with engine.connect() as conn:  # the others: not known (their next event decides)
            assert conn.exec_driver_sql("SELECT count(*) FROM stripe_invoice WHERE lines_incomplete IS NULL"
                                        ).scalar_one() == len(invoices) - len(marked)
        assert locked and not any(locked), locked
        downgrade(url, before)
        with engine.connect() as conn:
            assert conn.exec_driver_sql(columns).scalar_one() == 0
            assert conn.exec_driver_sql("SELECT to_regclass('ix_stripe_invoice_lines_incomplete')").scalar() is None
        upgrade(url)
        with engine.connect() as conn:
            assert conn.exec_driver_sql(columns).scalar_one() == 2
    finally:
        engine.dispose()


def test_the_invoice_lines_migration_runs_again_after_it_stopped_past_its_first_commit(empty_database: str):
    """invoice_lines_incomplete commits its columns before the backfill and builds its index
    concurrently: stopped past that commit (a failed or cancelled CREATE INDEX CONCURRENTLY leaves
    an invalid index; the backfill interrupted), the columns are there and alembic_version still
    names the revision before. Running it again finishes it (it stopped on "column already exists")."""
    from sqlalchemy import create_engine

    from app.migrate import upgrade

    url = empty_database
    before = upgrade_to_before(url, "invoice_lines_incomplete")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:  # what the stopped run left
            conn.exec_driver_sql("ALTER TABLE stripe_invoice ADD COLUMN lines_incomplete boolean, "
                                 "ADD COLUMN lines_asked_at timestamp with time zone")
        upgrade(url)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one() != before
            assert conn.exec_driver_sql("SELECT indisvalid FROM pg_index WHERE indexrelid = "
                                        "to_regclass('ix_stripe_invoice_lines_incomplete')").scalar_one()
    finally:
        engine.dispose()
