"""File Stripe customers' mirror rows under the account subs_customer names now.

A customer's mirror rows carry the account they are filed under (``account_key``, migration
mirror_account_key), so the sweep reads a range of accounts' rows with one range scan per table.
A customer is filed when its first mirror row arrives; it needs filing again when subs_customer
(owned by other teams) maps it only later, maps it to another account, or maps a customer that has
no mirror rows yet (filed, such a customer is read without any probe). Until then the sweep reaches
the customer's rows through its stripe_customer_id: filing changes how fast the sweep reads,
never what it reads.

Each call files at most ``limit`` customers in one short transaction. The candidates are found
first without a lock; the transaction then takes SHARE ROW EXCLUSIVE on mirror_customer (mirror
writers in flight finish first, new ones wait until the commit), looks again at those candidates
only, and moves their rows.
"""

from __future__ import annotations

from sqlalchemy import Engine

from app.db import unit_of_work

MIRROR_TABLES = ("stripe_invoice", "stripe_payment_attempt", "stripe_payment_method", "stripe_customer_state",
                 "stripe_subscription")

# Customers whose filing disagrees with subs_customer (never filed included).
CANDIDATES = """
SELECT c.stripe_customer_id FROM subs_customer c LEFT JOIN mirror_customer m USING (stripe_customer_id)
 WHERE m.account_key IS DISTINCT FROM c.account_id
 LIMIT %(limit)s
"""

REFILE = ("""
WITH todo AS MATERIALIZED (
  SELECT c.stripe_customer_id, c.account_id FROM subs_customer c LEFT JOIN mirror_customer m USING (stripe_customer_id)
   WHERE c.stripe_customer_id = ANY(%(ids)s) AND m.account_key IS DISTINCT FROM c.account_id),
""" + ",\n".join(
    f"{table} AS (UPDATE {table} t SET account_key = todo.account_id FROM todo "
    f"WHERE t.stripe_customer_id = todo.stripe_customer_id)" for table in MIRROR_TABLES) + """,
filed AS (
  INSERT INTO mirror_customer (stripe_customer_id, account_key, filed_at)
  SELECT stripe_customer_id, account_id, now() FROM todo
  ON CONFLICT (stripe_customer_id) DO UPDATE SET account_key = EXCLUDED.account_key, filed_at = now())
SELECT count(*) FROM todo
""")


def refile_customers(engine: Engine, limit: int = 5000) -> int:
    """File up to ``limit`` customers under their subs_customer account; -> how many were filed."""
    with engine.connect() as conn:
        ids = [r[0] for r in conn.exec_driver_sql(CANDIDATES, {"limit": limit})]
        conn.rollback()
    if not ids:
        return 0
    with unit_of_work(engine) as conn:
        conn.exec_driver_sql("LOCK TABLE mirror_customer IN SHARE ROW EXCLUSIVE MODE")
        filed = int(conn.exec_driver_sql(REFILE, {"ids": ids}).scalar_one())
    return filed
