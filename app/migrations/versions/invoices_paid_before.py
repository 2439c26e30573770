"""bad_debt_payment.invoices_paid_before: the customer's payments on each invoice at the quote.

Settlement reads "paid twice" from Stripe's invoice payments by the customer; an invoice paid in
part by card weeks before the debt (400 of 1000, the quote 600) was flagged for a refund nobody was
owed. Only the customer's payments beyond those Stripe listed when the balance was quoted count
now. Existing payments have none recorded (0: every customer payment counts, as before).

Revision ID: invoices_paid_before
Revises: settle_sent
Create Date: 2026-11-30 07:45:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = 'invoices_paid_before'
down_revision: Union[str, Sequence[str], None] = 'settle_sent'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('bad_debt_payment', sa.Column('invoices_paid_before', postgresql.JSONB(astext_type=sa.Text()),
                                                server_default=sa.text("'{}'::jsonb"), nullable=False))


def downgrade() -> None:
    op.drop_column('bad_debt_payment', 'invoices_paid_before')
