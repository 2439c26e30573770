"""outbox: an account's delivered cancellations, by a partial index.

An upgrade's revert is never sent after a cancellation of its subscription that Account Management
has taken (app/outbox/relay.py, _after_cancellation): the relay looks, right before sending a revert,
for a delivered CancellationRequested of the account naming that subscription. The outbox's other
indexes by account cover the undelivered rows only; this one holds the delivered cancellations only
(a few per account in bad debt), so the look-up reads no other history.

Revision ID: outbox_cancellations_delivered
Revises: outbox_conflict_since
Create Date: 2026-12-01 22:30:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'outbox_cancellations_delivered'
down_revision: str | Sequence[str] | None = 'outbox_conflict_since'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHERE = "event_type = 'CancellationRequested' AND state = 'delivered'"


def upgrade() -> None:
    # CONCURRENTLY: the outbox is written by every recompute; a plain build would hold those writes
    # for the length of its scan. An index left invalid by an interrupted build is built again.
    with op.get_context().autocommit_block():
        op.drop_index('ix_outbox_cancellations_delivered', table_name='outbox', postgresql_concurrently=True,
                      if_exists=True)
        op.create_index('ix_outbox_cancellations_delivered', 'outbox', ['account_id'],
                        postgresql_where=sa.text(WHERE), postgresql_concurrently=True)


def downgrade() -> None:
    op.drop_index('ix_outbox_cancellations_delivered', table_name='outbox')
