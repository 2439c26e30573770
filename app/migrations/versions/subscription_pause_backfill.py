"""stripe_subscription.collection_paused filled in from the subscription events already stored.

Migration subscription_collection_paused gave every subscription mirrored before it '{}': nothing
known of its pause of payment collection. Compute forgives an invoice marked uncollectible by a
mark_uncollectible pause only when a subscription event dated at or before the invoice's creation
said so, so a subscription paused before that release stayed "not paused" for every invoice created
before its next event: those were bad debt and the subscription was cancelled (and the renewal's
``customer.subscription.updated`` is often dated a second after its invoice, so it did not help the
invoice it came with). Every subscription event is kept in stripe_event (raw_body, never pruned):
each one the mirror took is read again here and what it said of ``pause_collection`` at its second is
merged into its subscription's row exactly as ingest merges it (webhooks/store.py "observations": the
union, per second the greater JSON text), so running it again, or over events ingest had already
merged, changes nothing.

Without holding stripe_subscription: the events are read by pages of their primary key (one pass of
the index, each page its own snapshot), each page's reports merged in a statement of its own that
locks only its rows, and never waits for one: rows a webhook holds (FOR UPDATE SKIP LOCKED) are
merged afterwards one statement each (holding no other row while it waits, no deadlock with ingest,
which locks its rows in key order). A body Python cannot read is skipped (none ingest took; Python
reads NaN, which a jsonb cast refuses).

Revision ID: subscription_pause_backfill
Revises: stripe_pass_pause
Create Date: 2026-12-02 01:45:00

"""
import json
from collections.abc import Mapping, Sequence
from typing import Any

from alembic import op

revision: str = 'subscription_pause_backfill'
down_revision: str | Sequence[str] | None = 'stripe_pass_pause'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PAGE = 5000
# The next page of stored events, by the primary key's index (no index on type: a filter in WHERE
# could make the planner scan the whole table for each page): the body of a subscription event the
# mirror took only (ingest writes no mirror row for an event of a type it ignores: trigger NULL).
EVENTS = """
SELECT id, CASE WHEN type LIKE 'customer.subscription.%%' AND trigger IS NOT NULL THEN raw_body END
  FROM stripe_event WHERE %(after)s::text IS NULL OR id > %(after)s ORDER BY id LIMIT %(page)s
"""
# Each report (subscription id, epoch second as text, behavior or NULL: not paused) merged into its
# row as ingest's "observations" merge does (webhooks/store.py _merged), computed from the row's
# latest version (a webhook's write that lands first is kept: the SET is re-evaluated on it). Returns
# the rows merged, and the reports' subscriptions with no row (never mirrored: nothing to merge into).
MERGE = """
WITH said AS (
    SELECT id, jsonb_object_agg(k, v::jsonb) AS said
      FROM (SELECT id, k, max(COALESCE(to_jsonb(b), 'null'::jsonb)::text) AS v
              FROM unnest(%(ids)s::text[], %(seconds)s::text[], %(behaviors)s::text[]) AS r(id, k, b)
             GROUP BY id, k) AS r
     GROUP BY id
), locked AS MATERIALIZED (
    SELECT s.id FROM stripe_subscription s WHERE s.id IN (SELECT id FROM said)
     ORDER BY s.id FOR UPDATE SKIP LOCKED
), merged AS (
    UPDATE stripe_subscription s SET collection_paused = (
        SELECT jsonb_object_agg(k, v::jsonb) FROM (
            SELECT k, max(v::text) AS v FROM (
                SELECT * FROM jsonb_each(s.collection_paused) UNION ALL SELECT * FROM jsonb_each(said.said)
            ) AS c(k, v) GROUP BY k) AS u)
      FROM said
     WHERE s.id = said.id AND s.id IN (SELECT id FROM locked) AND NOT s.collection_paused @> said.said
)
SELECT id, true FROM locked
UNION ALL
SELECT id, false FROM said WHERE NOT EXISTS (SELECT 1 FROM stripe_subscription s WHERE s.id = said.id)
"""
# The mirror writes rows for these subscription event types alone (app/domain/triggers.py).
TYPES = ("customer.subscription.created", "customer.subscription.updated", "customer.subscription.deleted",
         "customer.subscription.paused", "customer.subscription.resumed")


def upgrade() -> None:
    with op.get_context().autocommit_block():
        conn = op.get_bind()
        after: str | None = None
        held: list[tuple[str, str, str | None]] = []
        while True:
            page = conn.exec_driver_sql(EVENTS, {"after": after, "page": PAGE}).all()
            if not page:
                break
            after = page[-1][0]
            reports = [r for r in (_report(body) for _id_, body in page if body is not None) if r is not None]
            if reports:
                done = {sub for sub, _ in conn.exec_driver_sql(MERGE, _params(reports))}
                held.extend(r for r in reports if r[0] not in done)
        # The rows a webhook held just then: one statement each, waiting for it.
        for report in held:
            conn.exec_driver_sql(MERGE.replace("FOR UPDATE SKIP LOCKED", "FOR UPDATE"), _params([report]))


def downgrade() -> None:
    pass  # what the events said stays: the column is the earlier migration's


def _params(reports: list[tuple[str, str, str | None]]) -> dict[str, list[Any]]:
    return {"ids": [r[0] for r in reports], "seconds": [r[1] for r in reports], "behaviors": [r[2] for r in reports]}


def _id(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("id"), str):
        return str(value["id"])
    return None


def _report(body: str) -> tuple[str, str, str | None] | None:
    """(subscription id, the event's epoch second, pause_collection.behavior or None) of a subscription
    event's body, as webhooks/mirror.py extract reads it at this revision (read here, not imported: a
    migration must not change with later code); None for a body the mirror wrote no row of."""
    try:
        event: Any = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(event, Mapping) or event.get("object") != "event" or event.get("type") not in TYPES:
        return None
    created = event.get("created")
    if not isinstance(created, int) or isinstance(created, bool):
        return None
    data = event.get("data")
    obj = data.get("object") if isinstance(data, Mapping) else None
    if not isinstance(obj, Mapping) or obj.get("object") != "subscription" or not isinstance(obj.get("id"), str):
        return None
    if _id(obj.get("customer")) is None:
        return None  # a subscription billed to an account: no mirror row
    pause = obj.get("pause_collection")
    behavior = pause.get("behavior") if isinstance(pause, Mapping) else None
    return str(obj["id"]), str(created), behavior if isinstance(behavior, str) and behavior else None
