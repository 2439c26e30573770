"""bad_debt_payment.settle_sent: how many calls settlement sent to pay each invoice out of band.

Stripe replays a 5xx for an idempotency key's 24 hours, so a settlement whose call answered 500
failed all day with the account lifting. Each call after the first now gets a key of its own (an
invoice cannot be paid twice anyway), which needs the count of calls sent, kept here per invoice.

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
