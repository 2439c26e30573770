"""stripe_pass_pause: how long a beat pass that asks Stripe waits after a rate limit, across ticks.

The attempt-detail and invoice-lines passes (app/payments/stripe_pass.py) end on Stripe's 429, and
beat started the next one a minute later whatever the answer's ``Retry-After`` asked. The time the
pass may ask again is kept here, by the database's clock, one row per pass, shared by every worker.

Revision ID: stripe_pass_pause
Revises: subscription_collection_paused
Create Date: 2026-12-02 01:30:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'stripe_pass_pause'
down_revision: str | Sequence[str] | None = 'subscription_collection_paused'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('stripe_pass_pause',
                    sa.Column('name', sa.Text(), nullable=False),
                    sa.Column('not_before', sa.DateTime(timezone=True), nullable=False),
                    sa.PrimaryKeyConstraint('name', name=op.f('pk_stripe_pass_pause')))


def downgrade() -> None:
    op.drop_table('stripe_pass_pause')
