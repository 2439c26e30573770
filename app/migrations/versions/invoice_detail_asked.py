"""stripe_invoice.detail_asked_for: the failure of the invoice whose attempt detail Stripe was asked for.

An invoice.payment_failed carries no decline code (API 2025-03-31 and later); the charge.failed or
payment_intent.payment_failed that does may never come (an endpoint not subscribed to them, a
delivery Stripe gave up on). Beat asks Stripe's API for the detail of a failure still without it a
few minutes on (app/payments/attempt_detail.py), once per failure: this column holds the
last_failed_at it asked about. The partial index keeps that search to the open invoices that failed.

Revision ID: invoice_detail_asked
Revises: attempt_failed_at
Create Date: 2026-11-30 12:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = 'invoice_detail_asked'
down_revision: Union[str, Sequence[str], None] = 'attempt_failed_at'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('stripe_invoice', sa.Column('detail_asked_for', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_stripe_invoice_failed_open', 'stripe_invoice', ['last_failed_at'],
                    postgresql_where=sa.text("status = 'open' AND last_failed_at IS NOT NULL"))


def downgrade() -> None:
    op.drop_index('ix_stripe_invoice_failed_open', table_name='stripe_invoice')
    op.drop_column('stripe_invoice', 'detail_asked_for')
