"""Accounts with an invoice sent with payment terms are reviewed once, so each stores its due date.

Since d838bb8 an invoice sent with payment terms (a ``due_date``) becomes debt at its due date, and
compute stores that moment as the account's next review (``subs_dunning.next_review_at``), when beat
recomputes it: no Stripe event comes then (``invoice.overdue`` is not one this product acts on). A
decision stored before that, or before next_review_at itself (whose migration marked for review only
the accounts then in dunning), has no such moment: an account current when its invoice was sent stayed
current past the due date, never entering dunning, its products never restricted, until some other
event about it came, or the drift sweep found it (remediated only where the rollout reaches it). Every
account that owns an open invoice with a due date and money remaining is due for review now: one
recompute each, which stores its own next review. Few rows (customers who pay by invoice), one
statement.

Revision ID: review_due_dates
Revises: event_route_ids
Create Date: 2026-12-01 16:40:00

"""
from collections.abc import Sequence

from alembic import op

revision: str = 'review_due_dates'
down_revision: str | Sequence[str] | None = 'event_route_ids'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("""
        UPDATE subs_dunning d SET next_review_at = now()
         WHERE (d.next_review_at IS NULL OR d.next_review_at > now())
           AND EXISTS (SELECT 1 FROM subs_customer c JOIN stripe_invoice i USING (stripe_customer_id)
                        WHERE c.account_id = d.account_id AND i.status = 'open' AND i.due_date IS NOT NULL
                          AND i.amount_remaining > 0)
    """)


def downgrade() -> None:
    pass  # a review moment set earlier only recomputes the account once more
