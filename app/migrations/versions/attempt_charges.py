"""stripe_payment_attempt.charges: every charge made on a payment intent.

The card networks' cap (15 attempts per payment method in 30 days) counts charges. The mirror
keeps one row per payment intent, and Stripe confirms an invoice's intent again for each retry,
so an invoice retried 17 times on one card counted as one attempt. Each row now keeps its charges
(id -> method and time). Existing rows start with the one charge they name, at the row's time.

Revision ID: attempt_charges
Revises: next_review_at
Create Date: 2026-11-30 06:40:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = 'attempt_charges'
down_revision: Union[str, Sequence[str], None] = 'next_review_at'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('stripe_payment_attempt', sa.Column(
        'charges', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False))
    op.execute("""
        UPDATE stripe_payment_attempt
           SET charges = jsonb_build_object(charge_id, jsonb_build_object(
                   'pm', payment_method_id, 'at', floor(extract(epoch FROM attempted_at))::bigint))
         WHERE charge_id IS NOT NULL
    """)


def downgrade() -> None:
    op.drop_column('stripe_payment_attempt', 'charges')
