"""outbox: history retention reads the delivered rows it may remove by age, without the cancellations it keeps.

Since 6f1fe38 retention keeps the delivered CancellationRequested rows whatever their age (the relay
reads them before it sends an upgrade's revert: app/outbox/relay.py _after_cancellation). They pile up
for ever, a few per account that was ever in bad debt, and are the oldest delivered rows: each prune
batch walked ix_outbox_done (every delivered row, by delivered_at) from the oldest and read every
kept cancellation again, row by row, before the first row it removes, in every batch of every run,
more each year. ix_outbox_prunable holds the rows retention may remove only (its predicate is the
prune's own condition, app/history/prune.py KEPT_OUTBOX), so a batch reads what it removes. It
replaces ix_outbox_done, which nothing else reads.

Built and dropped CONCURRENTLY: the outbox is written by every recompute and the relay; a plain build
would hold those writes for the length of its scan. An index left invalid by an interrupted build is
built again.

Revision ID: outbox_prunable_by_age
Revises: dunning_no_fk_to_shared_account
Create Date: 2026-12-01 22:20:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'outbox_prunable_by_age'
down_revision: str | Sequence[str] | None = 'dunning_no_fk_to_shared_account'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As app/history/prune.py and app/models.py have them at this revision.
PRUNABLE = ("delivered_at IS NOT NULL AND NOT (event_type = 'CancellationRequested' AND state = 'delivered')")
DONE = "delivered_at IS NOT NULL"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index('ix_outbox_prunable', table_name='outbox', postgresql_concurrently=True, if_exists=True)
        op.create_index('ix_outbox_prunable', 'outbox', ['delivered_at'], postgresql_where=sa.text(PRUNABLE),
                        postgresql_concurrently=True)
        op.drop_index('ix_outbox_done', table_name='outbox', postgresql_concurrently=True, if_exists=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index('ix_outbox_done', table_name='outbox', postgresql_concurrently=True, if_exists=True)
        op.create_index('ix_outbox_done', 'outbox', ['delivered_at'], postgresql_where=sa.text(DONE),
                        postgresql_concurrently=True)
        op.drop_index('ix_outbox_prunable', table_name='outbox', postgresql_concurrently=True, if_exists=True)
