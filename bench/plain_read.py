"""The sweep benchmark's yardstick: a plain streaming read of the rows the sweep reads.

One SELECT per table that the sweep's batch gather (app/recompute/gather_batch.py: PAGE and DETAILS)
reads, restricted to the columns it reads and with the same row filters, each through a server-side
cursor (a psycopg2 named cursor, ``batch`` rows per round trip) into plain tuples that are counted and
dropped: no joins, no JSON aggregation (jsonb columns come back as text, unparsed, so the read does
less than the sweep's gather does with them), no Python work beyond fetching. The benchmark's
database holds only generated accounts, so every row of these tables belongs to a swept account.

Keep the list in step with gather_batch: a table the sweep starts to read belongs here too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Engine

SWEPT_ROWS: tuple[tuple[str, str], ...] = (
    ("subs_account", "SELECT account_id, bad_debt FROM subs_account"),
    ("subs_dunning", "SELECT account_id, status, level, failure_class, next_retry_at, retry_invoice_id, "
                     "retry_payment_method_id, retry_free, retries_used, outstanding_amount, unpaid_since, "
                     "last_failure_id, reasons::text, entitlements::text, actions_requested::text, policy_version, "
                     "version FROM subs_dunning"),
    ("subs_customer", "SELECT account_id, stripe_customer_id FROM subs_customer"),
    ("mirror_customer", "SELECT account_key, stripe_customer_id FROM mirror_customer"),
    ("stripe_invoice", "SELECT stripe_customer_id, id, status, billing_reason, subscription_id, amount_due, "
                       "amount_paid, amount_remaining, created, lines::text, currency, total, credited_amount, "
                       "attempt_count, due_date, first_failed_at, last_failed_at, paid_at, voided_at, "
                       "marked_uncollectible_at FROM stripe_invoice"),
    ("stripe_payment_attempt", "SELECT stripe_customer_id, id, invoice_id, payment_method_id, status, attempted_at, "
                               "amount, amount_refunded, decline_code, failure_code, advice_code "
                               "FROM stripe_payment_attempt"),
    ("stripe_payment_method", "SELECT stripe_customer_id, id, type, attached, changed_at, exp_month, exp_year, "
                              "card_brand, card_last4 FROM stripe_payment_method"),
    ("stripe_customer_state", "SELECT stripe_customer_id, default_payment_method_id, changed_at, source_created "
                              "FROM stripe_customer_state"),
    ("stripe_subscription", "SELECT stripe_customer_id, id, status, products::text FROM stripe_subscription"),
    ("payment_retry", "SELECT account_id, invoice_id, payment_method_id, retry_number, free, state, scheduled_for, "
                      "created_at FROM payment_retry"),
    ("bad_debt_payment", "SELECT account_id, id, state, amount, created_at, updated_at, failure_reason "
                         "FROM bad_debt_payment"),
    ("subs_mandate", "SELECT account_id, payment_method_id, type, status, status_reason, is_default, card_brand, "
                     "card_last4, exp_month, exp_year FROM subs_mandate"),
    ("subs_stuck_events", "SELECT account_id FROM subs_stuck_events WHERE state <> 'resolved'"),
    ("bad_debt_episode", "SELECT account_id, entered_at FROM bad_debt_episode WHERE exited_at IS NULL"),
)

# The figure quoted before the yardstick was corrected: one column of one table, through SQLAlchemy.
SUBS_ACCOUNT_ONLY = "SELECT account_id, bad_debt, name, email, billing_profile, created_at FROM subs_account"


@dataclass(frozen=True)
class PlainRead:
    rows: int
    seconds: float
    rows_by_table: dict[str, int]


def read_swept_rows(engine: Engine, batch: int) -> PlainRead:
    """Every row the sweep reads, table by table, ``batch`` rows per fetch, nothing kept."""
    by_table: dict[str, int] = {}
    raw = engine.raw_connection()
    try:
        started = time.perf_counter()
        for n, (table, sql) in enumerate(SWEPT_ROWS):
            cursor = raw.cursor(name=f"plain_{n}")  # named: a server-side cursor
            cursor.itersize = batch  # type: ignore[attr-defined]  # psycopg2's named cursor has it; DBAPI's does not
            cursor.execute(sql)
            count = 0
            while part := cursor.fetchmany(batch):
                count += len(part)
            cursor.close()
            by_table[table] = count
        seconds = time.perf_counter() - started
        raw.rollback()
    finally:
        raw.close()
    return PlainRead(sum(by_table.values()), seconds, by_table)


def read_subs_account_only(engine: Engine, batch: int) -> tuple[int, float]:
    """The old yardstick, unchanged: every subs_account row through SQLAlchemy's server-side cursor."""
    started = time.perf_counter()
    rows = 0
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=batch).exec_driver_sql(SUBS_ACCOUNT_ONLY)
        for part in result.partitions(batch):
            rows += len(part)
        conn.rollback()
    return rows, time.perf_counter() - started
