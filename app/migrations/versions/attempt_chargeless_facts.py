"""stripe_payment_attempt.failed_after_charge, failed_method: what a failure that made no charge named.

A failed 3-D Secure makes no charge, and its event ties with a charge's failure in the same second
(a reused intent's previous decline, or its next confirmation's). The tie was given to the failure
that made none in every case, although an intent's first confirmation can fail 3-D Secure and the
next be declined in that second; and its card was whichever event was delivered last, or whatever
card was stored when it arrived (an older charge's). failed_after_charge is the intent's
latest_charge when such a failure happened (the charges made before it), failed_method the card it
named (webhooks/store.py). Existing rows with such a failure get the charge the attempt knows as
its latest (by time) and the card they show today, so that they keep the outcome and card they have.

Revision ID: attempt_chargeless_facts
Revises: support_session_ended
Create Date: 2026-12-01 08:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = 'attempt_chargeless_facts'
down_revision: Union[str, Sequence[str], None] = 'support_session_ended'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('stripe_payment_attempt', sa.Column('failed_after_charge', sa.Text(), nullable=True))
    op.add_column('stripe_payment_attempt', sa.Column('failed_method', sa.Text(), nullable=True))
    op.execute("""
        UPDATE stripe_payment_attempt a SET failed_method = a.payment_method_id,
               failed_after_charge = (SELECT c.key FROM jsonb_each(a.charges) AS c
                                       ORDER BY (c.value->>'at')::bigint DESC, c.key DESC LIMIT 1)
         WHERE a.status = 'failed' AND a.charge_id IS NULL AND a.failed_at IS NOT NULL
    """)


def downgrade() -> None:
    op.drop_column('stripe_payment_attempt', 'failed_method')
    op.drop_column('stripe_payment_attempt', 'failed_after_charge')
