"""bad_debt_payment.settle_sent: settlement's calls to pay each invoice out of band, on record.

Settlement took an invoice Stripe refused to pay because it was already paid for one paid some
other way while the payment ran (the customer paid it twice: a refund is due). After its own call
had paid the invoice and answered 5xx, and Stripe's idempotency key had expired, it raised that
alarm for a customer who paid once. Each call is now recorded before it is sent: an invoice found
settled after one of them was settled by this payment.

Revision ID: settle_sent
Revises: bad_debt_reconcile
Create Date: 2026-11-30 07:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = 'settle_sent'
down_revision: Union[str, Sequence[str], None] = 'bad_debt_reconcile'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('bad_debt_payment', sa.Column(
        'settle_sent', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False))


def downgrade() -> None:
    op.drop_column('bad_debt_payment', 'settle_sent')
