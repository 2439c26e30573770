"""stripe_invoice.lines_incomplete and lines_asked_at: an invoice whose event carried only its first lines.

Stripe's invoice object in a webhook carries the first handful of its line items (``lines`` is a list
object with ``has_more``); the whole list is at ``GET /v1/invoices/<id>/lines``. The mirror kept the
first page as if it were all of them, so the products on the later lines of an unpaid invoice got no
consequences. ``lines_incomplete`` is the event's ``has_more`` (null: not known, a row no event of
this release wrote; the next event decides); beat (tasks.fetch_invoice_lines,
app/payments/invoice_lines.py) fetches the whole list of such an invoice while it is debt and
clears it. ``lines_asked_at``: when Stripe last refused to list them (asked again an hour later).
The partial index keeps beat's search to the few incomplete invoices; built CONCURRENTLY, as every
webhook writes stripe_invoice.

Revision ID: invoice_lines_incomplete
Revises: raw_body_storage_extended
Create Date: 2026-12-01 11:00:00

"""
import json
from typing import Any, Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = 'invoice_lines_incomplete'
down_revision: Union[str, Sequence[str], None] = 'raw_body_storage_extended'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


# The invoices that may be debt, with the raw body of the event their row came from where it says
# has_more somewhere (the regular expression only narrows the search: the body is read in Python,
# which parses every body ingest took, NaN included, where a jsonb cast would stop the migration).
# The body is looked up per invoice by the event's primary key: a join left the planner free to scan
# every stored event's body with the expression.
CANDIDATES = r"""
SELECT i.id, i.source_event_id,
       (SELECT e.raw_body FROM stripe_event e
         WHERE e.id = i.source_event_id AND e.raw_body ~ '"has_more"\s*:\s*true') AS raw_body
  FROM stripe_invoice i
 WHERE i.status IN ('open', 'uncollectible')
"""
# Only while the row still comes from the event read: one a webhook wrote meanwhile says for itself.
MARK = """
UPDATE stripe_invoice i SET lines_incomplete = true
  FROM unnest(%(ids)s::text[], %(events)s::text[]) AS u(id, source_event_id)
 WHERE i.id = u.id AND i.source_event_id = u.source_event_id
"""
BATCH = 1000


def upgrade() -> None:
    # Null: not known (no table rewrite). The rows mirrored before, and those the previous release
    # writes while it still runs, say nothing about has_more: counted as whole (a default false), a
    # first page kept whatever the invoice's next event said (webhooks/store.py "lines"). Unknown,
    # the next event decides under the ordering guard; the mirror always writes true or false.
    # IF NOT EXISTS: the columns are committed before the backfill and the index (below), so a run
    # stopped past that commit (an index build cancelled or failed) is run again from here.
    op.execute("ALTER TABLE stripe_invoice ADD COLUMN IF NOT EXISTS lines_incomplete boolean, "
               "ADD COLUMN IF NOT EXISTS lines_asked_at timestamp with time zone")
    # Invoices mirrored before: those whose latest event carried the first lines only are marked, so
    # that beat fetches them (and a later event's first page does not count as the whole list). Read
    # and marked after the new columns are committed: ADD COLUMN holds stripe_invoice's exclusive
    # lock to the end of its transaction, and every webhook and every recompute reads stripe_invoice
    # (the webhooks waited past their lock timeout while the raw bodies were read). Each batch of
    # marks is a transaction of its own, locking its rows only.
    with op.get_context().autocommit_block():
        conn = op.get_bind()
        found = [(row[0], row[1]) for row in conn.exec_driver_sql(CANDIDATES)
                 if row[2] is not None and _has_more(row[2])]
        for start in range(0, len(found), BATCH):
            batch = found[start:start + BATCH]
            conn.exec_driver_sql(MARK, {"ids": [b[0] for b in batch], "events": [b[1] for b in batch]})
    with op.get_context().autocommit_block():
        op.drop_index('ix_stripe_invoice_lines_incomplete', table_name='stripe_invoice',
                      postgresql_concurrently=True, if_exists=True)
        op.create_index('ix_stripe_invoice_lines_incomplete', 'stripe_invoice', ['id'],
                        postgresql_where=sa.text('lines_incomplete'), postgresql_concurrently=True)


def downgrade() -> None:
    op.drop_index('ix_stripe_invoice_lines_incomplete', table_name='stripe_invoice')
    op.drop_column('stripe_invoice', 'lines_asked_at')
    op.drop_column('stripe_invoice', 'lines_incomplete')


def _has_more(body: str) -> bool:
    try:
        event: Any = json.loads(body)
    except ValueError:
        return False
    for key in ("data", "object", "lines"):
        event = event.get(key) if isinstance(event, dict) else None
    lines = event
    return isinstance(lines, dict) and lines.get("has_more") is True
