"""Route the unroutable events by what changed, not by reading them all each tick.

Beat's re-drive (app/redrive.py, every 30 s) joined every ``stripe_event`` row in state
``unroutable`` against subs_customer and the invoice/attempt mirror on every tick. Many never route
(another product's customers, whom this fleet never maps) and stripe_event is never pruned: 0.4-0.5 s
a tick warm, 4.9 s cold at 50,000 such events, the 10 s statement timeout at about 500,000, when the
whole tick failed (the stale-request and due-review re-drives with it). A tick now looks only at the
events of customers mapped since the previous one, the newest events naming no customer, and a
bounded walk through the others by a cursor going round (see app/redrive.py).

* ``redrive_cursor``: the routing's cursors, written by the re-drive only: ``mapped_customers``, the
  (created_at, stripe_customer_id) of the last subs_customer row it took; ``unroutable_walk``, the
  (received_at, id) of the last event its walk read.
* On stripe_event, partial indexes over the unroutable events only (nothing for an event routed at
  ingest, the common path): by (received_at, id) for the walk and the newest, by route_invoice_id and
  route_payment_intent_id for the events a newly mapped customer's invoices and payments route.
  CONCURRENTLY: every webhook writes stripe_event (as stripe_event_lean_writes).

Revision ID: unroutable_routing_cursor
Revises: card_expiry_reviews
Create Date: 2026-12-01 16:55:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'unroutable_routing_cursor'
down_revision: str | Sequence[str] | None = 'card_expiry_reviews'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = (
    ('ix_stripe_event_unroutable_received', ['received_at', 'id'], "state = 'unroutable'"),
    ('ix_stripe_event_unroutable_invoice', ['route_invoice_id'],
     "state = 'unroutable' AND route_invoice_id IS NOT NULL"),
    ('ix_stripe_event_unroutable_intent', ['route_payment_intent_id'],
     "state = 'unroutable' AND route_payment_intent_id IS NOT NULL"),
)


def upgrade() -> None:
    op.create_table(
        'redrive_cursor',
        sa.Column('name', sa.Text(), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('after_id', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('name', name=op.f('pk_redrive_cursor')),
    )
    # An index left invalid by an interrupted build is built again.
    with op.get_context().autocommit_block():
        for name, columns, where in INDEXES:
            op.drop_index(name, table_name='stripe_event', postgresql_concurrently=True, if_exists=True)
            op.create_index(name, 'stripe_event', columns, postgresql_where=sa.text(where),
                            postgresql_concurrently=True)


def downgrade() -> None:
    for name, _, _ in INDEXES:
        op.drop_index(name, table_name='stripe_event')
    op.drop_table('redrive_cursor')
