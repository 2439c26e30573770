"""bad_debt_payment: what reconciling a payment with Stripe needs.

A bad-debt payment whose outcome never arrived (Stripe answered 5xx or not at all, its webhook was
lost, the web process died before saving Stripe's answer) stayed pending, and its account lifting,
for ever. Beat now asks Stripe about every payment pending past the guard window. It looks the
intent up by id, or lists the customer's intents by the payment's metadata when no id was saved,
so the row keeps its Stripe customer, when it is next due a check, how many checks it has had,
and since when Stripe has held no intent for it.

Revision ID: bad_debt_reconcile
Revises: attempt_charges
Create Date: 2026-11-30 07:30:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = 'bad_debt_reconcile'
down_revision: Union[str, Sequence[str], None] = 'attempt_charges'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

COLUMNS = ('stripe_customer_id', 'stripe_status', 'reconcile_after', 'reconcile_checks', 'not_found_since')


def upgrade() -> None:
    op.add_column('bad_debt_payment', sa.Column('stripe_customer_id', sa.Text(), nullable=True))
    op.add_column('bad_debt_payment', sa.Column('stripe_status', sa.Text(), nullable=True))
    op.add_column('bad_debt_payment', sa.Column('reconcile_after', sa.DateTime(timezone=True), nullable=True))
    op.add_column('bad_debt_payment', sa.Column('reconcile_checks', sa.Integer(), server_default='0',
                                                nullable=False))
    op.add_column('bad_debt_payment', sa.Column('not_found_since', sa.DateTime(timezone=True), nullable=True))
    # The payments still in flight keep their customer from their invoices.
    op.execute("""
        UPDATE bad_debt_payment b SET stripe_customer_id = (
            SELECT min(i.stripe_customer_id) FROM stripe_invoice i
             WHERE i.id IN (SELECT jsonb_array_elements_text(b.invoice_ids)))
         WHERE b.state = 'pending'
    """)
    op.create_index('ix_bad_debt_payment_pending', 'bad_debt_payment', ['created_at'],
                    postgresql_where=sa.text("state = 'pending'"))


def downgrade() -> None:
    op.drop_index('ix_bad_debt_payment_pending', table_name='bad_debt_payment')
    for column in COLUMNS:
        op.drop_column('bad_debt_payment', column)
