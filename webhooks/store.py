"""SQL of webhook ingest: the inbox insert, the guarded mirror upserts, the recompute request.

Every statement is prepared once per connection (app/db.py Prepared): the webhook path is
dominated by round trips and planning, not by the work itself. Ingest itself is one statement for
a whole batch of events (``ingest_events``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from datetime import datetime
from functools import cache
from typing import Any, NamedTuple

import orjson
from psycopg2.extras import Json
from sqlalchemy import Connection

from app.db import Prepared, ValueRejected, commit_dbapi, execute_prepared, fetch_prepared_all
from webhooks.mirror import Extracted, MirrorRow

GUARD = "({t}.source_created, {t}.source_rank) <= (EXCLUDED.source_created, EXCLUDED.source_rank)"
TIE = "({t}.source_created, {t}.source_rank) = (EXCLUDED.source_created, EXCLUDED.source_rank)"
# A table's own guard, where the payload says more than the ordering key. Two events of one
# subscription in the same second and rank (webhooks/mirror.py subscription_rank: the same status)
# with other products: the one whose previous_attributes report the other's products as its
# previous ones (prev_products) changed them after it, and wins in either order of delivery. The
# stored row stays only so; else, or when each names the other's (a change undone in the second),
# the last delivered, as before.
# Two updates of one card in one second (webhooks/mirror.py PAYMENT_METHOD_RANK), the same way: the
# one whose previous_attributes.card hold the other's values of those fields (prev_card) is later.
CARD = ("jsonb_build_object('card_brand', {t}.card_brand, 'card_last4', {t}.card_last4, 'exp_month', "
        "{t}.exp_month, 'exp_year', {t}.exp_year, 'fingerprint', {t}.fingerprint)")
GUARDS = {
    "stripe_subscription": (
        "(" + GUARD + " AND NOT (" + TIE + " AND {t}.products <> EXCLUDED.products"
        " AND COALESCE({t}.prev_products = EXCLUDED.products, FALSE)"
        " AND EXCLUDED.prev_products IS DISTINCT FROM {t}.products))"),
    "stripe_payment_method": (
        "(" + GUARD + " AND NOT (" + TIE + " AND {t}.prev_card IS NOT NULL"
        " AND " + CARD.replace("{t}", "EXCLUDED") + " @> {t}.prev_card"
        " AND NOT COALESCE(" + CARD + " @> EXCLUDED.prev_card, FALSE)))"),
    # A payment attempt that succeeded stays so: Stripe's success of a payment intent (or of a charge)
    # is final, and no later event about it is a new outcome. An older decline's event dated after
    # the success (its payment_intent.payment_failed a second late) turned the row failed again in
    # Stripe's own order, its latest failure then timed by the successful charge: a failure never
    # announced, so PaymentFailed went out again to a customer who had paid. The success wins in
    # any order of delivery; between two successes (or two others) the ordering key, as before.
    "stripe_payment_attempt": (
        "(CASE WHEN ({t}.status = 'succeeded') <> (EXCLUDED.status = 'succeeded') "
        "THEN EXCLUDED.status = 'succeeded' ELSE " + GUARD + " END)"),
}
# A payment attempt's failure that made no charge (3-D Secure failed): webhooks/mirror.py names none.
CHARGELESS = "({t}.status = 'failed' AND {t}.charge_id IS NULL)"
# Two outcomes of one payment intent in the same second and rank, about different charges: the event
# time cannot tell which came later (a reused intent's decline and its next confirmation's failed
# 3-D Secure), and the last delivered must not win. Each side's place in the second (TIE_PLACE): a
# charge by its id (of two charges the greater is taken for the later), a failure that made none
# just after the charge its latest_charge named when it failed (failed_after_charge; Stripe's
# latest_charge is the intent's latest charge at that moment, so a charge it does not name, or a
# null, means that charge came after it). The side with the greater place is the outcome, in either
# order; equal places are about one charge (or two failures after the same one): both sides alike.
TIE_PLACE = ("(CASE WHEN {c} THEN COALESCE({t}.failed_after_charge, '') ELSE COALESCE({t}.charge_id, '') END, {c})")


def _place(table: str) -> str:
    return TIE_PLACE.format(t=table, c=CHARGELESS.format(t=table))


KEYS = {"stripe_customer_state": "stripe_customer_id"}

Shape = tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]]  # table, columns, merge rules


def _upsert_sql(table: str, columns: tuple[str, ...], merge: tuple[tuple[str, str], ...], select: str) -> str:
    """INSERT ... ON CONFLICT DO UPDATE where each column follows the ordering guard or its merge rule.

    ``select`` yields the key and the columns, in that order (a VALUES list, or a SELECT).
    In ON CONFLICT DO UPDATE every {table}.col is the stored row's old value, so each CASE compares
    against the stored ordering key, including the ones updating source_* themselves.
    """
    merges = dict(merge)
    sets = [f"{col} = {_merged(merges.get(col), col, table)}" for col in columns]
    key = KEYS.get(table, "id")
    return (f"INSERT INTO {table} ({key}, {', '.join(columns)}) {select} "
            f"ON CONFLICT ({key}) DO UPDATE SET {', '.join(sets)}")


def _tie_cases(col: str, table: str) -> str:
    """The WHEN branches of an outcome column in a same-second, same-rank tie: the side with the
    greater place (TIE_PLACE) is the outcome; equal places (one charge's two events, or two failures
    after the same charge) both ways alike, the greater where both speak."""
    tie, mine, theirs = TIE.format(t=table), _place(table), _place("EXCLUDED")
    return (f"WHEN {tie} AND {theirs} = {mine} THEN GREATEST(EXCLUDED.{col}, {table}.{col}) "
            f"WHEN {tie} AND {theirs} > {mine} THEN EXCLUDED.{col} "
            f"WHEN {tie} THEN {table}.{col}")


def _success_cases(col: str, table: str) -> str:
    """The WHEN branches of an attempt's outcome column (its charge, its codes) where one side
    succeeded and the other did not: the success's, whole (GUARDS: a success is final). Its charge
    is not a decline's: an older decline's event must not fill the charge of a success that names
    none (invoice_payment.paid), nor a success naming none keep a decline's; the intent's own
    success fills it in any order (coalesce between successes)."""
    mine, theirs = f"{table}.status = 'succeeded'", "EXCLUDED.status = 'succeeded'"
    return (f"WHEN {mine} AND NOT {theirs} THEN {table}.{col} "
            f"WHEN {theirs} AND NOT {mine} THEN EXCLUDED.{col}")


def _merged(kind: str | None, col: str, table: str) -> str:
    """The value ``col`` of ``table`` takes on conflict, by its merge rule ``kind`` (None: the guard's)."""
    guard = GUARDS.get(table, GUARD).format(t=table)
    tie = TIE.format(t=table)
    if kind == "least":
        return f"LEAST({table}.{col}, EXCLUDED.{col})"
    if kind == "greatest":
        return f"GREATEST({table}.{col}, EXCLUDED.{col})"
    if kind == "tie_greatest":
        # The guard's, but in a same-second, same-rank tie the greater: for a value that only grows
        # while the row keeps its rank (an invoice's post-payment credit), where the last delivered
        # of the two would pick one by the order of delivery.
        return (f"CASE WHEN {tie} THEN GREATEST({table}.{col}, EXCLUDED.{col}) "
                f"WHEN {guard} THEN EXCLUDED.{col} ELSE {table}.{col} END")
    if kind == "coalesce":
        return (f"CASE WHEN {guard} THEN COALESCE(EXCLUDED.{col}, {table}.{col}) "
                f"ELSE COALESCE({table}.{col}, EXCLUDED.{col}) END")
    if kind == "per_charge":
        # The outcome of one charge: a newer event about another charge (the next attempt on the
        # same payment intent), or a failure that made none (charge_id null), replaces it whole,
        # nulls included; about the same charge (its payment intent's event) it fills what is
        # missing, like coalesce. An older event about another charge (delivered late) changes
        # nothing of the newer one. In the same second and rank the side with the greater place
        # (TIE_PLACE) is the outcome, whole, as outcome_charge decides it; equal places (one
        # charge's two events, or two failures after the same charge) both ways alike: the greater
        # where both speak, so that the order of delivery does not pick one.
        other_charge = (f"((EXCLUDED.charge_id IS NOT NULL AND EXCLUDED.charge_id IS DISTINCT FROM "
                        f"{table}.charge_id) OR {CHARGELESS.format(t='EXCLUDED')})")
        return (f"CASE {_success_cases(col, table)} {_tie_cases(col, table)} "
                f"WHEN {guard} AND {other_charge} THEN EXCLUDED.{col} "
                f"WHEN {other_charge} THEN {table}.{col} "
                f"WHEN {guard} THEN COALESCE(EXCLUDED.{col}, {table}.{col}) "
                f"ELSE COALESCE({table}.{col}, EXCLUDED.{col}) END")
    if kind == "outcome_charge":
        # The charge per_charge compares with: like coalesce, but a newer failure that made no
        # charge clears it, and no older event names one after such a failure. In a tie the side
        # with the greater place (TIE_PLACE); equal places: the greater.
        return (f"CASE {_success_cases(col, table)} {_tie_cases(col, table)} "
                f"WHEN {guard} AND {CHARGELESS.format(t='EXCLUDED')} THEN NULL "
                f"WHEN {guard} THEN COALESCE(EXCLUDED.{col}, {table}.{col}) "
                f"WHEN {CHARGELESS.format(t=table)} THEN NULL "
                f"ELSE COALESCE({table}.{col}, EXCLUDED.{col}) END")
    if kind == "chargeless_fact":
        # What the attempt's newest failure that made no charge said (the latest_charge it named,
        # the card it named): by failed_at (set by those failures only), in the same second by its
        # place (the one after the greater charge), else the greater. The same in any order.
        after = "COALESCE({t}.failed_after_charge, '')"
        return (f"CASE WHEN EXCLUDED.failed_at IS NULL THEN {table}.{col} "
                f"WHEN {table}.failed_at IS NULL OR EXCLUDED.failed_at > {table}.failed_at THEN EXCLUDED.{col} "
                f"WHEN EXCLUDED.failed_at < {table}.failed_at THEN {table}.{col} "
                f"WHEN {after.format(t='EXCLUDED')} > {after.format(t=table)} THEN EXCLUDED.{col} "
                f"WHEN {after.format(t='EXCLUDED')} < {after.format(t=table)} THEN {table}.{col} "
                f"ELSE GREATEST(EXCLUDED.{col}, {table}.{col}) END")
    if kind == "outcome_method":
        # The method of the outcome charge (charge_id) as the merged charges know it: a charge's own
        # event always names its method, its intent's failure often none (the intent's
        # payment_method is null after a failure). Coalesce alone kept an older charge's method when
        # the newest charge's event came after its intent's. Where the outcome made no charge (a
        # failed 3-D Secure): the card that failure named, else the card of the charge its
        # latest_charge named (the card in use when it failed): coalesce kept whichever card was
        # stored when it arrived (an older charge's), or the last delivered of a same-second tie.
        # Where neither is known: coalesce.
        charges = _merged("charges", "charges", table)
        charge = _merged("outcome_charge", "charge_id", table)
        status = _merged(None, "status", table)
        named = _merged("chargeless_fact", "failed_method", table)
        after = _merged("chargeless_fact", "failed_after_charge", table)
        own = (f"CASE WHEN ({status}) = 'failed' AND ({charge}) IS NULL "
               f"THEN COALESCE({named}, ({charges}) -> ({after}) ->> 'pm') "
               f"ELSE ({charges}) -> ({charge}) ->> 'pm' END")
        return f"COALESCE({own}, {_merged('coalesce', col, table)})"
    if kind == "default_method":
        # A customer's default method (and the one it changed from, taken from the same side):
        # customer.updated comes for any change (the delinquent flag after a failed payment too),
        # several in one second, and each shows the whole customer. In a tie the event that reports
        # a change of the default (changed_at, set at its own second) wins: it shows the state after
        # the change, an event of the same second that does not report it may be from just before.
        # Two changes: the one that changed from the other's default (its previous_attributes name
        # it, prev_default_payment_method_id) came after it; else, or none, the greater default.
        changed_here = f"{table}.changed_at >= to_timestamp({table}.source_created)"
        d, p = "default_payment_method_id", "prev_default_payment_method_id"
        theirs_later = (f"(EXCLUDED.{p} IS NOT DISTINCT FROM {table}.{d} "
                        f"AND {table}.{p} IS DISTINCT FROM EXCLUDED.{d})")
        mine_later = (f"({table}.{p} IS NOT DISTINCT FROM EXCLUDED.{d} "
                      f"AND EXCLUDED.{p} IS DISTINCT FROM {table}.{d})")
        # The side with the greater default (GREATEST's, NULL the least); the same default: the greater.
        greater = (f"CASE WHEN EXCLUDED.{d} IS NOT DISTINCT FROM {table}.{d} "
                   f"THEN GREATEST(EXCLUDED.{col}, {table}.{col}) "
                   f"WHEN {table}.{d} IS NULL OR EXCLUDED.{d} > {table}.{d} THEN EXCLUDED.{col} "
                   f"ELSE {table}.{col} END")
        return (f"CASE WHEN {tie} AND EXCLUDED.changed_at IS NOT NULL AND {changed_here} "
                f"THEN CASE WHEN {theirs_later} THEN EXCLUDED.{col} WHEN {mine_later} THEN {table}.{col} "
                f"ELSE {greater} END "
                f"WHEN {tie} AND EXCLUDED.changed_at IS NOT NULL THEN EXCLUDED.{col} "
                f"WHEN {tie} AND {changed_here} THEN {table}.{col} "
                f"WHEN {tie} THEN {greater} "
                f"WHEN {guard} THEN EXCLUDED.{col} ELSE {table}.{col} END")
    if kind == "lines":
        # An invoice's lines and whether they are all there (lines_incomplete: the event's has_more),
        # taken together from one side. Once finalized an invoice's lines no longer change, so its
        # whole list (fetched by beat, app/payments/invoice_lines.py, or all in its event) stays
        # whatever comes later or late: an event carrying the first lines only neither replaces it
        # nor marks it incomplete again, and it replaces a first page in any order of delivery.
        # A draft's lines may still change, and a row whose lines_incomplete is null (mirrored
        # before it was kept) may hold a first page: otherwise the ordering guard's.
        whole = "({t}.status <> 'draft' AND NOT {t}.lines_incomplete)"
        return (f"CASE WHEN {whole.format(t=table)} THEN {table}.{col} "
                f"WHEN {whole.format(t='EXCLUDED')} THEN EXCLUDED.{col} "
                f"WHEN {guard} THEN EXCLUDED.{col} ELSE {table}.{col} END")
    if kind == "observations":
        # What each event said at its second ({epoch second: value}), kept from every event in any
        # order of delivery: the union of both sides. Two events of one second that say different
        # things: the greater JSON text (null, "not paused", over a behavior), the same in any order.
        return (f"CASE WHEN EXCLUDED.{col} = '{{}}' THEN {table}.{col} ELSE ("
                "SELECT jsonb_object_agg(k, v::jsonb) FROM ("
                "SELECT k, max(v::text) AS v FROM ("
                f"SELECT * FROM jsonb_each({table}.{col}) UNION ALL SELECT * FROM jsonb_each(EXCLUDED.{col})"
                ") AS c(k, v) GROUP BY k) AS u) END")
    if kind == "charges":
        # A union of the charges either side knows, in any order of delivery: per charge the
        # earliest time (a charge's own event is exact, its intent's comes later) and the
        # method whichever event named it.
        return (f"CASE WHEN EXCLUDED.{col} = '{{}}' THEN {table}.{col} ELSE ("
                "SELECT jsonb_object_agg(k, jsonb_build_object('pm', pm, 'at', at)) FROM ("
                "SELECT k, max(v->>'pm') AS pm, min((v->>'at')::bigint) AS at FROM ("
                f"SELECT * FROM jsonb_each({table}.{col}) UNION ALL SELECT * FROM jsonb_each(EXCLUDED.{col})"
                ") AS c(k, v) GROUP BY k) AS u) END")
    return f"CASE WHEN {guard} THEN EXCLUDED.{col} ELSE {table}.{col} END"

def _named(prefix: str, sql: str, types: tuple[str, ...] = ()) -> Prepared:
    return Prepared(f"{prefix}_{hashlib.sha1(sql.encode()).hexdigest()[:12]}", sql, types)


@cache
def _upsert(table: str, columns: tuple[str, ...], merge: tuple[tuple[str, str], ...]) -> Prepared:
    values = ", ".join(f"${i}" for i in range(1, len(columns) + 2))
    return _named(f"dunning_upsert_{table}", _upsert_sql(table, columns, merge, f"VALUES ({values})"))


def _shape(row: MirrorRow) -> Shape:
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

# Ingest's database work for any number of events in one statement, so one round trip and (run on
# its own) one implicit transaction and one WAL flush for all of them (group commit: the webhook
# requests waiting at the same moment share it, webhooks/group_commit.py). For each event: store
# it once, resolve its account, write its mirror row unless it is a redelivery or of an ignored
# type, and request the account's recompute when it is routed; a success of the isolated bad-debt
# payment requests it as BAD_DEBT_PAID. Data-modifying CTEs all see the snapshot the statement
# started with, so the events of one statement must not touch the same row or read a row another
# writes: ``waves`` splits a batch into statements where they would. Several events of one account
# are fine: the first creates its request (and is enqueued), the others find it.
INGEST_HEAD = """
WITH owner AS MATERIALIZED (
    -- Each event's raw body by its position in the array: a subscript rather than a join with
    -- unnest, whose hash join cost its start-up on every statement.
    SELECT x.*, ($2::text[])[x.n] AS raw, COALESCE(
        (SELECT account_id FROM subs_customer WHERE stripe_customer_id = x.customer),
        (SELECT c.account_id FROM stripe_invoice i JOIN subs_customer c USING (stripe_customer_id)
          WHERE i.id = x.invoice_id),
        (SELECT c.account_id FROM stripe_payment_attempt a JOIN subs_customer c USING (stripe_customer_id)
          WHERE a.id = x.payment_intent)
    ) AS account_id
    FROM (SELECT r.n, r.id, r.type, r.created, r.invoice_id, r.payment_intent, r.trigger,
                 -- A payment method's event naming no customer (payment_method.detached whose
                 -- previous_attributes are absent): the customer the method's row knows.
                 COALESCE(r.customer, (SELECT m.stripe_customer_id FROM stripe_payment_method m
                                        WHERE m.id = r.payment_method)) AS customer
            FROM json_to_recordset($1::json) AS r(n int, id text, type text, created bigint, customer text,
                                                  invoice_id text, payment_intent text, trigger text,
                                                  payment_method text)) AS x
), event AS (
    -- An event stored unroutable keeps the invoice and the payment intent it was looked up by: beat's
    -- re-drive routes it by them once their mirror rows are filed under an account (app/redrive.py).
    -- NULL for every event routed here, so the common path writes nothing more.
    INSERT INTO stripe_event (id, type, stripe_created, stripe_customer_id, account_id, trigger, state, raw_body,
                              route_invoice_id, route_payment_intent_id)
    SELECT id, type, created, customer, account_id, trigger,
           CASE WHEN trigger IS NULL THEN 'ignored' WHEN account_id IS NULL THEN 'unroutable' ELSE 'accepted' END,
           raw,
           CASE WHEN trigger IS NOT NULL AND account_id IS NULL THEN invoice_id END,
           CASE WHEN trigger IS NOT NULL AND account_id IS NULL THEN payment_intent END
      FROM owner ORDER BY n
    ON CONFLICT (id) DO NOTHING
    RETURNING id, account_id, state
), request AS (
    INSERT INTO recompute_request (account_id, trigger, cause)
    SELECT DISTINCT ON (e.account_id) e.account_id,
           CASE WHEN o.type IN ({paid}) AND EXISTS (
                    SELECT 1 FROM bad_debt_payment b
                     WHERE b.account_id = e.account_id AND b.state = 'pending'
                       AND (b.stripe_payment_intent_id = o.payment_intent
                            OR b.invoice_ids ? COALESCE(o.invoice_id, '')))
                THEN 'BAD_DEBT_PAID' ELSE o.trigger END,
           o.id
      FROM event e JOIN owner o USING (id)
     WHERE e.state = 'accepted'
     ORDER BY e.account_id, o.n  -- the first event of each account; rows locked in key order
    ON CONFLICT (account_id) DO UPDATE SET trigger = recompute_request.trigger, touched_at = clock_timestamp()
    RETURNING cause, trigger, (xmax = 0) AS created
){mirrors}
SELECT e.account_id, e.state, r.trigger, r.created
  FROM owner o LEFT JOIN event e USING (id) LEFT JOIN request r ON r.cause = o.id
 ORDER BY o.n
""".replace("{paid}", ", ".join(f"'{t}'" for t in PAID_TYPES))
HEAD_PARAMS = 2  # the events (JSON), their raw bodies (text[])
# The mirror tables in the order their parameters follow the head's.
MIRROR_TABLES = ("stripe_invoice", "stripe_payment_attempt", "stripe_subscription", "stripe_payment_method",
                 "stripe_customer_state")


@cache
def _column_type(table: str, column: str) -> str:
    """The column's SQL type, as the model declares it."""
    from sqlalchemy.dialects import postgresql

    from app.models import Base

    return str(Base.metadata.tables[table].c[column].type.compile(dialect=postgresql.dialect()))


def _is_json(table: str, column: str) -> bool:
    return _column_type(table, column) in ("JSON", "JSONB")


def _mirror_cte(shape: Shape, param: int) -> str:
    """The upsert of one table's rows, which parameter ``$param`` holds as a JSON array of objects
    (key, each column, the event's id), joined to the events actually stored and acted on."""
    table, columns, merge = shape
    key = KEYS.get(table, "id")
    names = (key, *columns, "event_id")
    # JSON columns arrive as JSON values (jsonb), every other one is read as the model declares it.
    types = ("TEXT", *("JSONB" if _is_json(table, c) else _column_type(table, c) for c in columns), "TEXT")
    record = ", ".join(f"{name} {t}" for name, t in zip(names, types, strict=True))
    picked = ", ".join(f"m.{c}" for c in (key, *columns))
    # In key order, as every statement locks rows of a table: two concurrent batches touching the
    # same rows then wait for each other instead of deadlocking.
    select = (f"SELECT {picked} FROM json_to_recordset(${param}::json) AS m({record}) "
              f"JOIN event e ON e.id = m.event_id WHERE e.state <> 'ignored' ORDER BY m.{key}")
    return f"mirror_{table} AS (\n    {_upsert_sql(table, columns, merge, select)}\n)"


@cache
def _ingest(shapes: tuple[Shape, ...]) -> Prepared:
    ctes = [_mirror_cte(shape, HEAD_PARAMS + 1 + i) for i, shape in enumerate(shapes)]
    mirrors = "".join(f", {cte}" for cte in ctes)
    return _named("dunning_ingest", INGEST_HEAD.replace("{mirrors}", mirrors))


class Stored(NamedTuple):  # one per event on the hot path: a tuple is the cheapest to build
    account_id: str | None
    state: str  # accepted | unroutable | ignored
    trigger: str | None  # the recompute's trigger, when this event requested it
    created: bool  # this event created the account's pending request: the caller enqueues


Item = tuple[Extracted, str]  # an extracted event and its raw body


def waves(items: list[Item]) -> list[list[int]]:
    """Split a batch (indexes into ``items``) into statements that can each run as one: no two events
    of a statement share an event id or a mirror row, or look up a row another one writes. An event
    goes after the last statement it conflicts with, so conflicting events keep their order."""
    out: list[list[int]] = []
    touched: list[set[tuple[str, str]]] = []
    for i, (ex, _raw) in enumerate(items):
        keys = {("event", ex.event_id), *((row.table, row.key) for row in ex.rows)}
        if ex.invoice_id:
            keys.add(("stripe_invoice", ex.invoice_id))
        if ex.payment_intent:
            keys.add(("stripe_payment_attempt", ex.payment_intent))
        at = next((w + 1 for w in range(len(out) - 1, -1, -1) if touched[w] & keys), 0)
        if at == len(out):
            out.append([])
            touched.append(set())
        out[at].append(i)
        touched[at] |= keys
    return out


def _json(value: Any) -> str:
    """A parameter as JSON text: orjson writes a batch's values in one call. psycopg2 quoting them
    element by element, one array per column, took about four times as long (45 against 175 µs for
    a batch of 4 events), and PostgreSQL reads the JSON a little faster too.
    A string that is not valid UTF-8 (a lone surrogate) is a value nothing can store."""
    try:
        return orjson.dumps(value, default=_isoformat).decode()
    except TypeError as exc:  # orjson.JSONEncodeError
        raise ValueRejected(f"value cannot be stored: {exc}") from exc


def _isoformat(value: Any) -> str:
    """A datetime of a subclass orjson does not take as one (freezegun's, in tests)."""
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _statement(items: list[Item]) -> tuple[Prepared, tuple[Any, ...]]:
    exs = [ex for ex, _ in items]
    events = [{"n": n, "id": ex.event_id, "type": ex.type, "created": ex.created, "customer": ex.customer,
               "invoice_id": ex.invoice_id, "payment_intent": ex.payment_intent,
               "trigger": ex.trigger.value if ex.trigger else None, "payment_method": ex.payment_method}
              for n, ex in enumerate(exs, 1)]
    params: list[Any] = [_json(events), [raw for _, raw in items]]
    by_table: dict[str, list[tuple[str, MirrorRow]]] = {}
    for ex in exs:
        for row in ex.rows:
            by_table.setdefault(row.table, []).append((ex.event_id, row))
    shapes = []
    for table in MIRROR_TABLES:
        rows = by_table.get(table)
        if not rows:
            continue
        first = rows[0][1]
        shape = _shape(first)
        if any(row.values.keys() != first.values.keys() or row.merge != first.merge for _, row in rows):
            raise ValueError(f"mirror rows of {table} differ in their columns")  # extract() never does this
        shapes.append(shape)
        key = KEYS.get(table, "id")
        params.append(_json([{key: row.key, **row.values, "event_id": event_id} for event_id, row in rows]))
    return _ingest(tuple(shapes)), tuple(params)


def ingest_events(conn: Connection, items: list[Item]) -> list[Stored | None]:
    """Store, mirror and request for every event, one statement per wave (normally one). For each
    event in order: what was stored, or None when the event was stored before (a redelivery).
    All or nothing: on a connection in autocommit (the group commit's) several waves run as one
    transaction, so that a batch that fails stored none of its events (each is then stored alone;
    one already committed would come back as a redelivery, answered "duplicate" and not enqueued)."""
    for ex, _ in items:
        if len(ex.rows) > 1:
            raise ValueError("an event mirrors at most one row")  # extract() never builds more
    out: list[Stored | None] = [None] * len(items)
    plan = waves(items)
    with _one_transaction(conn) if len(plan) > 1 else nullcontext():
        for wave in plan:
            rows = fetch_prepared_all(conn, _statement([items[i] for i in wave]))
            for i, (account_id, state, trigger, created) in zip(wave, rows, strict=True):
                out[i] = None if state is None else Stored(account_id, state, trigger, bool(created))
    return out


@contextmanager
def _one_transaction(conn: Connection) -> Iterator[None]:
    """The statements inside as one transaction, on a connection psycopg2 runs in autocommit; on one
    already in a transaction (a unit of work), they are part of that one anyway."""
    dbapi = conn.connection.driver_connection
    if not dbapi.autocommit:  # type: ignore[union-attr]
        yield
        return
    dbapi.autocommit = False  # type: ignore[union-attr]  # psycopg2 begins one at the next statement
    try:
        yield
        # Named as the statements' errors are: a connection lost once the COMMIT was sent is
        # DatabaseUnavailable (503, Stripe redelivers), not a driver error answered 500.
        commit_dbapi(conn)
    except BaseException:
        with suppress(Exception):  # a lost connection: the caller drops it
            dbapi.rollback()  # type: ignore[union-attr]
        raise
    finally:
        with suppress(Exception):
            dbapi.autocommit = True  # type: ignore[union-attr]


# DO UPDATE (not DO NOTHING) so the row is locked until this transaction commits: a recompute
# deleting the request waits for it, and so gathers a snapshot that includes this event. Finding it
# pending touches it (touched_at, as INGEST_HEAD does), so a request a dead recompute had taken is
# sent again by the stale-request re-drive (app/redrive.py). clock_timestamp(): read at the update,
# after any wait for the row, so never the touched_at of the version a failed run took.
REQUEST_RECOMPUTE = Prepared("dunning_request_recompute", """
INSERT INTO recompute_request (account_id, trigger, cause) VALUES ($1, $2, $3)
ON CONFLICT (account_id) DO UPDATE SET trigger = recompute_request.trigger, touched_at = clock_timestamp()
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
