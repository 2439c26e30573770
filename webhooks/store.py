"""SQL of webhook ingest: the inbox insert, the guarded mirror upserts, the recompute request."""

from __future__ import annotations

from functools import cache
from typing import Any

from psycopg2.extras import Json
from sqlalchemy import Connection

from webhooks.mirror import Extracted, MirrorRow

GUARD = "({t}.source_created, {t}.source_rank) <= (EXCLUDED.source_created, EXCLUDED.source_rank)"


@cache
def _upsert_sql(table: str, columns: tuple[str, ...], merge: tuple[tuple[str, str], ...]) -> str:
    guard = GUARD.format(t=table)
    merges = dict(merge)
    sets = []
    for col in columns:
        kind = merges.get(col)
        if kind == "least":
            sets.append(f"{col} = LEAST({table}.{col}, EXCLUDED.{col})")
        elif kind == "greatest":
            sets.append(f"{col} = GREATEST({table}.{col}, EXCLUDED.{col})")
        elif kind == "coalesce":
            sets.append(f"{col} = CASE WHEN {guard} THEN COALESCE(EXCLUDED.{col}, {table}.{col}) "
                        f"ELSE COALESCE({table}.{col}, EXCLUDED.{col}) END")
        else:
            sets.append(f"{col} = CASE WHEN {guard} THEN EXCLUDED.{col} ELSE {table}.{col} END")
    names = ", ".join(("id" if table != "stripe_customer_state" else "stripe_customer_id", *columns))
    placeholders = ", ".join(f"%({c})s" for c in ("_key", *columns))
    key = "id" if table != "stripe_customer_state" else "stripe_customer_id"
    # In ON CONFLICT DO UPDATE every {table}.col is the stored row's old value, so each CASE
    # compares against the stored ordering key, including the ones updating source_* themselves.
    return (f"INSERT INTO {table} ({names}) VALUES ({placeholders}) "
            f"ON CONFLICT ({key}) DO UPDATE SET {', '.join(sets)}")


def _param(value: Any) -> Any:
    return Json(value) if isinstance(value, list | dict) else value


def upsert_row(conn: Connection, row: MirrorRow) -> None:
    columns = tuple(row.values)
    sql = _upsert_sql(row.table, columns, tuple(sorted(row.merge.items())))
    params = {c: _param(v) for c, v in row.values.items()}
    params["_key"] = row.key
    conn.exec_driver_sql(sql, params)


INSERT_EVENT = """
WITH owner AS (
    SELECT COALESCE(
        (SELECT account_id FROM subs_customer WHERE stripe_customer_id = %(customer)s),
        (SELECT c.account_id FROM stripe_invoice i JOIN subs_customer c USING (stripe_customer_id)
          WHERE i.id = %(invoice)s),
        (SELECT c.account_id FROM stripe_payment_attempt a JOIN subs_customer c USING (stripe_customer_id)
          WHERE a.id = %(payment_intent)s)
    ) AS account_id
)
INSERT INTO stripe_event (id, type, stripe_created, stripe_customer_id, account_id, trigger, state, raw_body)
SELECT %(id)s, %(type)s, %(created)s, %(customer)s, owner.account_id, %(trigger)s,
       CASE WHEN %(trigger)s IS NULL THEN 'ignored'
            WHEN owner.account_id IS NULL THEN 'unroutable'
            ELSE 'accepted' END,
       %(raw)s
FROM owner
ON CONFLICT (id) DO NOTHING
RETURNING account_id, state
"""


def insert_event(conn: Connection, ex: Extracted, raw: str) -> tuple[str | None, str] | None:
    """Store the event once. None when it was stored before (a redelivery)."""
    row = conn.exec_driver_sql(INSERT_EVENT, {
        "id": ex.event_id, "type": ex.type, "created": ex.created, "customer": ex.customer,
        "invoice": ex.invoice_id, "payment_intent": ex.payment_intent,
        "trigger": ex.trigger.value if ex.trigger else None, "raw": raw,
    }).first()
    return None if row is None else (row[0], row[1])


# DO UPDATE (not DO NOTHING) so the row is locked until this transaction commits: a recompute
# deleting the request waits for it, and so gathers a snapshot that includes this event.
REQUEST_RECOMPUTE = """
INSERT INTO recompute_request (account_id, trigger, cause) VALUES (%(account)s, %(trigger)s, %(cause)s)
ON CONFLICT (account_id) DO UPDATE SET trigger = recompute_request.trigger
RETURNING (xmax = 0) AS created
"""


def request_recompute(conn: Connection, account_id: str, trigger: str, cause: str | None) -> bool:
    """True when this created the account's pending request (so the caller must enqueue)."""
    row = conn.exec_driver_sql(REQUEST_RECOMPUTE, {"account": account_id, "trigger": trigger, "cause": cause}).first()
    return bool(row and row[0])
