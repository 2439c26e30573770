"""payment_retry: what the mirror held of Stripe's side when the retry was claimed, by Stripe's clock.

* ``attempts_seen_until``: the latest attempt on the invoice (stripe_payment_attempt.attempted_at)
  the mirror held at the claim; NULL: none.
* ``default_change_seen_at``: when the invoice's customer last changed its default payment method
  (stripe_customer_state.changed_at) as the mirror held it at the claim; NULL: never.

The worker charging the retry stops it when the mirror holds a later one of either (app/payments/pay.py):
Stripe's times compared with Stripe's times. It compared them with the claim's own time
(payment_retry.created_at, beat's clock), which no skew rule relates to Stripe's: on a beat host ahead
of Stripe, a payment or a default card change made just after the claim looked older than it.

Rows that may still be charged (dispatched, charging) get the thresholds that reproduce the rule they
were claimed under: attempts after the claim's time, a default changed from the claim's second on.
Other rows are never checked again; a skipped one claimed again gets its marks then.

Revision ID: retry_claim_stripe_marks
Revises: sweep_error_failure_class
Create Date: 2026-12-01 20:00:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'retry_claim_stripe_marks'
down_revision: str | Sequence[str] | None = 'sweep_error_failure_class'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('payment_retry', sa.Column('attempts_seen_until', sa.DateTime(timezone=True), nullable=True))
    op.add_column('payment_retry', sa.Column('default_change_seen_at', sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE payment_retry SET attempts_seen_until = created_at, "
               "default_change_seen_at = date_trunc('second', created_at) - interval '1 microsecond' "
               "WHERE state IN ('dispatched', 'charging')")


def downgrade() -> None:
    op.drop_column('payment_retry', 'default_change_seen_at')
    op.drop_column('payment_retry', 'attempts_seen_until')
