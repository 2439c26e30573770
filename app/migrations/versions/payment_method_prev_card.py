"""stripe_payment_method.prev_card: the card's fields an update changed, with their values before it.

Two updates of one card in one second (payment_method.updated and .automatically_updated: the card
updater's new expiry, and a change of its billing details) tied on the mirror's ordering key, and the
last delivered won: delivered out of order, the mirror kept the card's old expiry, and the expired-card
rules and the mandate read it. The update whose previous_attributes.card hold the other's values of
those fields changed the card after it (webhooks/store.py GUARDS); this column keeps what the stored
row's event changed from.

Nullable, no backfill: NULL is an event that changed none of the kept fields (and every row stored
before), which ties as before.

Revision ID: payment_method_prev_card
Revises: outbox_conflicts_blocked_before
Create Date: 2026-12-01 22:05:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = 'payment_method_prev_card'
down_revision: str | Sequence[str] | None = 'outbox_conflicts_blocked_before'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('stripe_payment_method', sa.Column('prev_card', postgresql.JSONB(astext_type=sa.Text()),
                                                     nullable=True))


def downgrade() -> None:
    op.drop_column('stripe_payment_method', 'prev_card')
