"""stripe_subscription.collection_paused: the pause of payment collection each event reported.

A subscription whose payment collection the merchant paused with ``behavior = mark_uncollectible``
(Stripe's grace period: the subscription stays active, the service on) has each new invoice
finalized and marked uncollectible at once, never attempted. Compute read such an invoice as bad
debt and cancelled the subscription. The mirror now keeps, per subscription, what each of its events
said of ``pause_collection`` at the event's second ({epoch second: behavior, or null}), so compute can
tell a marking made by the pause from a debt. Rows mirrored before this know nothing of it ('{}'):
their subscriptions' next events fill it in.

Revision ID: subscription_collection_paused
Revises: request_created_at
Create Date: 2026-12-02 01:10:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = 'subscription_collection_paused'
down_revision: str | Sequence[str] | None = 'request_created_at'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A constant default: PostgreSQL stores it once for the existing rows, no table rewrite.
    op.add_column('stripe_subscription', sa.Column('collection_paused', postgresql.JSONB(astext_type=sa.Text()),
                                                   server_default=sa.text("'{}'::jsonb"), nullable=False))


def downgrade() -> None:
    op.drop_column('stripe_subscription', 'collection_paused')
