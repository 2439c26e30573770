"""stripe_subscription.prev_products, stripe_customer_state.prev_default_payment_method_id: what a row's
event reported as changed from (previous_attributes).

Two customer.subscription.updated of one subscription in the same second with the same status tie
on the mirror's ordering key, and the last delivered won: delivered out of order, an item swap
made in one second as two updates (a plan swapped, an add-on removed) kept the products between
them until the subscription's next event, and the entitlements followed. The event that reports
the other's products as its previous ones (previous_attributes.items) is the later one
(webhooks/store.py GUARDS); this column keeps what the stored row's event reported.

Two customer.updated changing the customer's default payment method in one second tied too, and
went to the greater payment method id (a coin toss, in any order of delivery): retries and the
default mandate could stay on the card the customer had just replaced. The change that reports the
other's default as its previous one is the later one (webhooks/store.py "default_method").

Nullable, no backfill: NULL is an event that reported no change (and every row stored before),
which ties as before.

Revision ID: subscription_prev_products
Revises: dunning_announced_failures
Create Date: 2026-12-01 22:10:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = 'subscription_prev_products'
down_revision: str | Sequence[str] | None = 'dunning_announced_failures'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('stripe_subscription', sa.Column('prev_products', postgresql.JSONB(astext_type=sa.Text()),
                                                   nullable=True))
    op.add_column('stripe_customer_state', sa.Column('prev_default_payment_method_id', sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column('stripe_customer_state', 'prev_default_payment_method_id')
    op.drop_column('stripe_subscription', 'prev_products')
