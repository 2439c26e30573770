"""subs_dunning.outstanding: what an account owes, per currency.

outstanding_amount sums the unpaid invoices' amount_remaining whatever their currencies: an account
of several Stripe customers billed in USD and EUR owing 1000 of each showed 2000. Compute now keeps
the amount per currency ([{"currency", "amount"}, ...], sorted by currency); the API, the support
page and `dunning recompute` show it, and give outstanding_amount only for a debt in one currency.

Nullable. The rows that owe nothing need nothing (NULL with outstanding_amount 0 reads as nothing
owed). A row owing money whose account's invoices are all in one currency owes outstanding_amount in
that currency: filled in here, one statement over the accounts in dunning only. The others (several
currencies) stay NULL (not known: shown as such, and no drift for the sweep) and are due for review
now, so beat recomputes each once, which stores it.

Revision ID: dunning_outstanding
Revises: review_due_dates
Create Date: 2026-12-01 16:45:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = 'dunning_outstanding'
down_revision: str | Sequence[str] | None = 'review_due_dates'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('subs_dunning', sa.Column('outstanding', postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.execute("""
        UPDATE subs_dunning d
           SET outstanding = jsonb_build_array(jsonb_build_object('currency', one.currency,
                                                                  'amount', d.outstanding_amount))
          FROM (SELECT c.account_id, min(i.currency) AS currency
                  FROM subs_customer c JOIN stripe_invoice i USING (stripe_customer_id)
                 WHERE c.account_id IN (SELECT account_id FROM subs_dunning WHERE outstanding_amount <> 0)
                 GROUP BY c.account_id HAVING count(DISTINCT i.currency) = 1) one
         WHERE d.account_id = one.account_id AND d.outstanding_amount <> 0 AND d.outstanding IS NULL
    """)
    op.execute("""
        UPDATE subs_dunning SET next_review_at = now()
         WHERE outstanding IS NULL AND outstanding_amount <> 0
           AND (next_review_at IS NULL OR next_review_at > now())
    """)


def downgrade() -> None:
    op.drop_column('subs_dunning', 'outstanding')
