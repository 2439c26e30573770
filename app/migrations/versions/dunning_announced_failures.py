"""subs_dunning.announced_failures: the failures PaymentFailed has announced, of the debt still unpaid.

PaymentFailed was emitted only for a failure newer than the last one announced (last_failure_id, a
single marker): an older failure learned late (invoice A declined with expired_card, its webhooks
delivered after invoice B's later decline was announced) was never announced, and the customer was
never asked to act. Compute now keeps the markers of every failure of the debt (the unpaid
invoices' and the bad-debt payments' of this debt), all announced by the change that stores them;
a failure not among them is announced, however old. A failure whose invoice is settled leaves the
list, so it stays as small as the debt.

Nullable, no backfill: NULL with last_failure_id NULL is nothing announced (every current account:
no write on its next recompute); NULL with a last_failure_id (accounts in dunning today) reads as
before, every failure not newer than last_failure_id announced, so nothing already announced is
announced again; the account's next recompute that changes anything writes the list.

Revision ID: dunning_announced_failures
Revises: outbox_cancellations_delivered
Create Date: 2026-12-01 21:50:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = 'dunning_announced_failures'
down_revision: str | Sequence[str] | None = 'outbox_cancellations_delivered'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('subs_dunning', sa.Column('announced_failures', postgresql.JSONB(astext_type=sa.Text()),
                                            nullable=True))


def downgrade() -> None:
    op.drop_column('subs_dunning', 'announced_failures')
