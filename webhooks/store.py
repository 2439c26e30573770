"""SQL of webhook ingest: the inbox insert, the guarded mirror upserts, the recompute request.

Every statement is prepared once per connection (app/db.py Prepared): the webhook path is
dominated by round trips and planning, not by the work itself.
"""

from __future__ import annotations

import hashlib
from functools import cache
from typing import Any

from psycopg2.extras import Json
from sqlalchemy import Connection

from app.db import Prepared, execute_prepared
from webhooks.mirror import Extracted, MirrorRow

GUARD = "({t}.source_created, {t}.source_rank) <= (EXCLUDED.source_created, EXCLUDED.source_rank)"
KEYS = {"stripe_customer_state": "stripe_customer_id"}


@cache
def _upsert(table: str, columns: tuple[str, ...], merge: tuple[tuple[str, str], ...]) -> Prepared:
    """INSERT ... ON CONFLICT DO UPDATE where each column follows the ordering guard or its merge rule.

    In ON CONFLICT DO UPDATE every {table}.col is the stored row's old value, so each CASE compares
    against the stored ordering key, including the ones updating source_* themselves.
    """
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
    key = KEYS.get(table, "id")
    placeholders = ", ".join(f"${i}" for i in range(1, len(columns) + 2))
    sql = (f"INSERT INTO {table} ({key}, {', '.join(columns)}) VALUES ({placeholders}) "
           f"ON CONFLICT ({key}) DO UPDATE SET {', '.join(sets)}")
    digest = hashlib.sha1(sql.encode()).hexdigest()[:12]
    return Prepared(f"dunning_upsert_{table}_{digest}", sql)


def _param(value: Any) -> Any:
    return Json(value) if isinstance(value, list | dict) else value


def _upsert_call(row: MirrorRow) -> tuple[Prepared, tuple[Any, ...]]:
    statement = _upsert(row.table, tuple(row.values), tuple(sorted(row.merge.items())))
    return statement, (row.key, *(_param(v) for v in row.values.values()))


def upsert_row(conn: Connection, row: MirrorRow) -> None:
    execute_prepared(conn, _upsert_call(row))


INSERT_EVENT = Prepared("dunning_insert_event", """
WITH owner AS (
    SELECT COALESCE(
        (SELECT account_id FROM subs_customer WHERE stripe_customer_id = $4),
        (SELECT c.account_id FROM stripe_invoice i JOIN subs_customer c USING (stripe_customer_id)
          WHERE i.id = $5),
        (SELECT c.account_id FROM stripe_payment_attempt a JOIN subs_customer c USING (stripe_customer_id)
          WHERE a.id = $6)
    ) AS account_id
)
INSERT INTO stripe_event (id, type, stripe_created, stripe_customer_id, account_id, trigger, state, raw_body)
SELECT $1, $2, $3, $4, owner.account_id, $7,
       CASE WHEN $7 IS NULL THEN 'ignored'
            WHEN owner.account_id IS NULL THEN 'unroutable'
            ELSE 'accepted' END,
       $8
FROM owner
ON CONFLICT (id) DO NOTHING
RETURNING account_id, state
""", ("text", "text", "bigint", "text", "text", "text", "text", "text"))


def insert_event(conn: Connection, ex: Extracted, raw: str) -> tuple[str | None, str] | None:
    """Store the event once. None when it was stored before (a redelivery)."""
    row = execute_prepared(conn, (INSERT_EVENT, (
        ex.event_id, ex.type, ex.created, ex.customer, ex.invoice_id, ex.payment_intent,
        ex.trigger.value if ex.trigger else None, raw,
    ))).first()
    return None if row is None else (row[0], row[1])


# DO UPDATE (not DO NOTHING) so the row is locked until this transaction commits: a recompute
# deleting the request waits for it, and so gathers a snapshot that includes this event.
REQUEST_RECOMPUTE = Prepared("dunning_request_recompute", """
INSERT INTO recompute_request (account_id, trigger, cause) VALUES ($1, $2, $3)
ON CONFLICT (account_id) DO UPDATE SET trigger = recompute_request.trigger
RETURNING (xmax = 0) AS created
""")


def request_recompute(conn: Connection, account_id: str, trigger: str, cause: str | None,
                      rows: tuple[MirrorRow, ...] = ()) -> bool:
    """Upsert ``rows`` and request the account's recompute, in one round trip. True when this
    created the account's pending request (so the caller must enqueue)."""
    calls = [_upsert_call(row) for row in rows]
    calls.append((REQUEST_RECOMPUTE, (account_id, trigger, cause)))
    row = execute_prepared(conn, *calls).first()
    return bool(row and row[0])
