"""SQL of webhook ingest: the inbox insert, the guarded mirror upserts, the recompute request.

Every statement is prepared once per connection (app/db.py Prepared): the webhook path is
dominated by round trips and planning, not by the work itself.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from typing import Any

from psycopg2.extras import Json
from sqlalchemy import Connection

from app.db import Prepared, execute_prepared, fetch_prepared_row
from webhooks.mirror import Extracted, MirrorRow

GUARD = "({t}.source_created, {t}.source_rank) <= (EXCLUDED.source_created, EXCLUDED.source_rank)"
KEYS = {"stripe_customer_state": "stripe_customer_id"}


def _upsert_sql(table: str, columns: tuple[str, ...], merge: tuple[tuple[str, str], ...], first: int,
                source: str) -> str:
    """INSERT ... ON CONFLICT DO UPDATE where each column follows the ordering guard or its merge rule.

    The key and the columns are parameters ``$first``, ``$first+1``, ...; ``source`` is what the
    values are selected from (``VALUES``, or a CTE that decides whether to write at all).
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
    values = ", ".join(f"${i}" for i in range(first, first + len(columns) + 1))
    select = f"VALUES ({values})" if source == "VALUES" else f"SELECT {values} FROM {source}"
    return (f"INSERT INTO {table} ({key}, {', '.join(columns)}) {select} "
            f"ON CONFLICT ({key}) DO UPDATE SET {', '.join(sets)}")


def _named(prefix: str, sql: str, types: tuple[str, ...] = ()) -> Prepared:
    return Prepared(f"{prefix}_{hashlib.sha1(sql.encode()).hexdigest()[:12]}", sql, types)


@cache
def _upsert(table: str, columns: tuple[str, ...], merge: tuple[tuple[str, str], ...]) -> Prepared:
    return _named(f"dunning_upsert_{table}", _upsert_sql(table, columns, merge, 1, "VALUES"))


def _shape(row: MirrorRow) -> tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]]:
    return row.table, tuple(row.values), tuple(sorted(row.merge.items()))


def _param(value: Any) -> Any:
    return Json(value) if isinstance(value, list | dict) else value


def _row_params(row: MirrorRow) -> tuple[Any, ...]:
    return (row.key, *(_param(v) for v in row.values.values()))


def _upsert_call(row: MirrorRow) -> tuple[Prepared, tuple[Any, ...]]:
    return _upsert(*_shape(row)), _row_params(row)


def upsert_row(conn: Connection, row: MirrorRow) -> None:
    execute_prepared(conn, _upsert_call(row))


PAID_TYPES = ("invoice.paid", "invoice.payment_succeeded", "payment_intent.succeeded", "invoice_payment.paid")

# The whole of ingest's database work in one statement, so in one round trip and (run on its own)
# one implicit transaction: store the event once, resolve its account, write its mirror row unless
# the event is a redelivery or of an ignored type, and request the account's recompute when the
# event is routed. A success of the isolated bad-debt payment requests it as BAD_DEBT_PAID.
# Data-modifying CTEs all see the snapshot the statement started with; an event has at most one
# mirror row, so no two of them touch the same row.
INGEST_HEAD = """
WITH owner AS (
    SELECT COALESCE(
        (SELECT account_id FROM subs_customer WHERE stripe_customer_id = $4),
        (SELECT c.account_id FROM stripe_invoice i JOIN subs_customer c USING (stripe_customer_id)
          WHERE i.id = $5),
        (SELECT c.account_id FROM stripe_payment_attempt a JOIN subs_customer c USING (stripe_customer_id)
          WHERE a.id = $6)
    ) AS account_id
), event AS (
    INSERT INTO stripe_event (id, type, stripe_created, stripe_customer_id, account_id, trigger, state, raw_body)
    SELECT $1, $2, $3, $4, owner.account_id, $7,
           CASE WHEN $7 IS NULL THEN 'ignored'
                WHEN owner.account_id IS NULL THEN 'unroutable'
                ELSE 'accepted' END,
           $8
    FROM owner
    ON CONFLICT (id) DO NOTHING
    RETURNING account_id, state
), request AS (
    INSERT INTO recompute_request (account_id, trigger, cause)
    SELECT event.account_id,
           CASE WHEN $2 IN ({paid}) AND EXISTS (
                    SELECT 1 FROM bad_debt_payment b
                     WHERE b.account_id = event.account_id AND b.state = 'pending'
                       AND (b.stripe_payment_intent_id = $6 OR b.invoice_ids ? COALESCE($5, '')))
                THEN 'BAD_DEBT_PAID' ELSE $7 END,
           $1
      FROM event WHERE event.state = 'accepted'
    ON CONFLICT (account_id) DO UPDATE SET trigger = recompute_request.trigger
    RETURNING trigger, (xmax = 0) AS created
){mirror}
SELECT event.account_id, event.state, request.trigger, request.created FROM event LEFT JOIN request ON true
""".replace("{paid}", ", ".join(f"'{t}'" for t in PAID_TYPES))
INGEST_TYPES = ("text", "text", "bigint", "text", "text", "text", "text", "text")


@cache
def _ingest(shape: tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]] | None) -> Prepared:
    mirror = ""
    if shape is not None:
        upsert = _upsert_sql(*shape, first=len(INGEST_TYPES) + 1, source="event WHERE event.state <> 'ignored'")
        mirror = f", mirror AS (\n    {upsert}\n)"
    return _named("dunning_ingest", INGEST_HEAD.replace("{mirror}", mirror), INGEST_TYPES)


@dataclass(frozen=True)
class Stored:
    account_id: str | None
    state: str  # accepted | unroutable | ignored
    trigger: str | None  # the recompute's trigger, when this event requested it
    created: bool  # this event created the account's pending request: the caller enqueues


def ingest_event(conn: Connection, ex: Extracted, raw: str) -> Stored | None:
    """Store, mirror and request in one round trip. None when the event was stored before."""
    if len(ex.rows) > 1:
        raise ValueError("an event mirrors at most one row")  # extract() never builds more
    row = ex.rows[0] if ex.rows else None
    params = (ex.event_id, ex.type, ex.created, ex.customer, ex.invoice_id, ex.payment_intent,
              ex.trigger.value if ex.trigger else None, raw, *(_row_params(row) if row else ()))
    result = fetch_prepared_row(conn, (_ingest(_shape(row) if row else None), params))
    if result is None:
        return None
    return Stored(result[0], result[1], result[2], bool(result[3]))


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
