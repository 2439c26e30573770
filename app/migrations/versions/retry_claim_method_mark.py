"""payment_retry.method_change_seen_at: when the retry's card last changed, as the mirror held it at the claim.

Stripe's clock (stripe_payment_method.changed_at); NULL: the retry names no card, the mirror did not
know it, or the row predates this column. Compute counts a retry claimed knowing of a card's change as
a try of the card after it (app/domain/retry_cadence.py, _tried_since): the claim's own time is beat's
clock, and on a beat host behind Stripe a retry claimed after the card's update was timed before it,
so the card it had just charged earned a free retry at once. Rows from before keep the claim's time only.

Revision ID: retry_claim_method_mark
Revises: retry_claim_stripe_marks
Create Date: 2026-12-01 20:10:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'retry_claim_method_mark'
down_revision: str | Sequence[str] | None = 'retry_claim_stripe_marks'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('payment_retry', sa.Column('method_change_seen_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('payment_retry', 'method_change_seen_at')
