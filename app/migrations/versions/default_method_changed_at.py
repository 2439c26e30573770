"""stripe_customer_state.changed_at: when the default payment method last changed, or NULL.

It used to take the time of every customer.updated, whatever changed (metadata, the delinquent flag
Stripe sets after a failed invoice payment), and compute read it as "default method changed after
the failure", which earns an immediate retry: on a card just declined as stolen, for one. The
mirror now sets it only from an event whose previous_attributes name the default payment method,
so a customer whose default never changed (as far as the mirror saw) has none. Existing values
stay: which of them were real changes is not known here, and compute no longer treats a "change"
to the very method that failed as a new one.

Revision ID: default_method_changed_at
Revises: raw_body_lz4
Create Date: 2026-11-30 04:30:00

"""
from typing import Sequence, Union

from alembic import op

revision: str = 'default_method_changed_at'
down_revision: Union[str, Sequence[str], None] = 'raw_body_lz4'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.alter_column('stripe_customer_state', 'changed_at', nullable=True)


def downgrade() -> None:
    op.execute("UPDATE stripe_customer_state SET changed_at = to_timestamp(source_created) WHERE changed_at IS NULL")
    op.alter_column('stripe_customer_state', 'changed_at', nullable=False)
