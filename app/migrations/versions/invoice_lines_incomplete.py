"""stripe_invoice.lines_incomplete and lines_asked_at: an invoice whose event carried only its first lines.

Stripe's invoice object in a webhook carries the first handful of its line items (``lines`` is a list
object with ``has_more``); the whole list is at ``GET /v1/invoices/<id>/lines``. The mirror kept the
first page as if it were all of them, so the products on the later lines of an unpaid invoice got no
consequences. ``lines_incomplete`` is the event's ``has_more``; beat (tasks.fetch_invoice_lines,
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


# The invoices that may be debt, mirrored from an event whose raw body says has_more somewhere (the
# regular expression only narrows the search: the body is read in Python, which parses every body
# ingest took, NaN included, where a jsonb cast would stop the migration).
CANDIDATES = r"""
SELECT i.id, e.raw_body FROM stripe_invoice i JOIN stripe_event e ON e.id = i.source_event_id
 WHERE i.status IN ('open', 'uncollectible') AND e.raw_body ~ '"has_more"\s*:\s*true'
"""


def upgrade() -> None:
    # A constant default: no table rewrite (PostgreSQL 11 and later).
    op.add_column('stripe_invoice', sa.Column('lines_incomplete', sa.Boolean(), server_default=sa.text('false'),
                                              nullable=False))
    op.add_column('stripe_invoice', sa.Column('lines_asked_at', sa.DateTime(timezone=True), nullable=True))
    # Invoices mirrored before: those whose latest event carried the first lines only are marked, so
    # that beat fetches them (and a later event's first page does not count as the whole list).
    conn = op.get_bind()
    incomplete = [row[0] for row in conn.exec_driver_sql(CANDIDATES) if _has_more(row[1])]
    if incomplete:
        conn.exec_driver_sql("UPDATE stripe_invoice SET lines_incomplete = true WHERE id = ANY(%(ids)s)",
                             {"ids": incomplete})
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
