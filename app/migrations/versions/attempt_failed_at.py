"""stripe_payment_attempt.failed_at: when the attempt's latest failure that made no charge was reported.

A payment intent's failure is timed by its latest charge (stripe_payment_attempt.charges), which
later events about it do not move. A failure that made no charge (3-D Secure failed) has none: it was
timed by attempted_at, which moves with every later event about the intent, so the same failure was
announced again (PaymentFailed), and on a reused intent, whose charges still hold the earlier declined
charge, it was not announced at all. failed_at is the time of the latest event that reported such a
failure (GREATEST, set by those events only). Existing failures with no charge keep the time they
are timed by today, attempted_at, from now on fixed; a failed authentication beside earlier charges
gets it too (and is announced once, as it should have been).

Revision ID: attempt_failed_at
Revises: request_touched_at
Create Date: 2026-12-01 14:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = 'attempt_failed_at'
down_revision: Union[str, Sequence[str], None] = 'request_touched_at'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('stripe_payment_attempt', sa.Column('failed_at', sa.DateTime(timezone=True), nullable=True))
    # A failure that names no charge: with no charge at all, timed by attempted_at until now (kept);
    # beside earlier charges, only a failed authentication (a bank debit's failure read as chargeless
    # by 4362144 was made by the charge it was timed by, and is not announced again).
    op.execute("""
        UPDATE stripe_payment_attempt SET failed_at = attempted_at
         WHERE status = 'failed' AND charge_id IS NULL
           AND (charges = '{}'::jsonb OR failure_code = 'payment_intent_authentication_failure')
    """)


def downgrade() -> None:
    op.drop_column('stripe_payment_attempt', 'failed_at')
