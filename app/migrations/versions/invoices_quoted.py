"""bad_debt_payment.invoices_quoted: what Stripe's invoices owed when the balance was quoted.

A partial credit note issued on a covered invoice while the payment ran (a bank debit processing
for days) lowered what the invoice owed with no payment of the customer's on it: the charge took
the whole quote, settlement marked the invoice paid, and the customer's overpayment by the credit
went unnoticed. Each invoice's amount_remaining and pre_payment_credit_notes_amount at the quote
are kept now; settlement compares the latter with Stripe's invoice. Existing payments have none
recorded ('{}': settled as before, with no check of credit notes).

Revision ID: invoices_quoted
Revises: outbox_last_answer
Create Date: 2026-12-03 09:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = 'invoices_quoted'
down_revision: Union[str, Sequence[str], None] = 'outbox_last_answer'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('bad_debt_payment', sa.Column('invoices_quoted', postgresql.JSONB(astext_type=sa.Text()),
                                                server_default=sa.text("'{}'::jsonb"), nullable=False))


def downgrade() -> None:
    op.drop_column('bad_debt_payment', 'invoices_quoted')
