"""Indexes for history retention: outbox rows the relay is done with, and sweep errors, by age.

tasks.prune_history (app/history/prune.py) removes, a batch at a time and oldest first, the rows
older than HISTORY_RETENTION_DAYS. The outbox's indexes cover the undelivered rows only and
sweep_error's the current rollout stage's only, so each batch would have read the whole table
(the outbox is the largest history there is). drift_record has its found_at index already;
sweep_run (a row per sweep) and the resolved subs_stuck_events rows are small.

Revision ID: history_retention
Revises: invoices_quoted
Create Date: 2026-12-04 09:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = 'history_retention'
down_revision: Union[str, Sequence[str], None] = 'invoices_quoted'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # CONCURRENTLY: the outbox is written by every recompute; a plain build would hold those writes
    # for the length of its scan. An index left invalid by an interrupted build is built again.
    with op.get_context().autocommit_block():
        op.drop_index('ix_outbox_done', table_name='outbox', postgresql_concurrently=True, if_exists=True)
        op.create_index('ix_outbox_done', 'outbox', ['delivered_at'], postgresql_where=sa.text("delivered_at IS NOT NULL"),
                        postgresql_concurrently=True)
        op.drop_index('ix_sweep_error_at', table_name='sweep_error', postgresql_concurrently=True, if_exists=True)
        op.create_index('ix_sweep_error_at', 'sweep_error', ['at'], postgresql_concurrently=True)


def downgrade() -> None:
    op.drop_index('ix_sweep_error_at', table_name='sweep_error')
    op.drop_index('ix_outbox_done', table_name='outbox')
