"""Indexes for two periodic reads that scanned a table only growing: claimed retries and lifting accounts.

* ``payment_retry`` (never pruned: a row per retry ever made): tasks.dispatch_due_retries, every 30 s,
  looks for retries claimed but never sent (state ``dispatched``, a handful at any time) and read
  the whole table to find them (app/payments/retries.py UNSENT_SQL, UNSENT_TOO_LONG_SQL): 300 ms a
  tick at 2 million rows, the 10 s statement timeout at about 60 million, when no retry would be
  dispatched any more. ``ix_payment_retry_dispatched`` holds the claimed rows only.
* ``subs_dunning`` (a row per account): the stuck-in-lifting gauge, refreshed at every /metrics scrape
  of every replica, and /ops/lifting and /support/lifting read every account for the few in
  ``lifting`` (app/metrics_db.py, app/sweep/lifting.py). ``ix_subs_dunning_lifting`` holds those.

Revision ID: periodic_scans
Revises: dunning_outstanding
Create Date: 2026-12-01 16:15:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = 'periodic_scans'
down_revision: Union[str, Sequence[str], None] = 'dunning_outstanding'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # CONCURRENTLY: every recompute writes subs_dunning and every dispatch payment_retry; a plain build
    # would hold those writes for the length of its scan. An index left invalid by an interrupted
    # build is built again.
    with op.get_context().autocommit_block():
        op.drop_index('ix_payment_retry_dispatched', table_name='payment_retry', postgresql_concurrently=True,
                      if_exists=True)
        op.create_index('ix_payment_retry_dispatched', 'payment_retry', ['created_at'],
                        postgresql_where=sa.text("state = 'dispatched'"), postgresql_concurrently=True)
        op.drop_index('ix_subs_dunning_lifting', table_name='subs_dunning', postgresql_concurrently=True,
                      if_exists=True)
        op.create_index('ix_subs_dunning_lifting', 'subs_dunning', ['account_id'],
                        postgresql_where=sa.text("status = 'lifting'"), postgresql_concurrently=True)


def downgrade() -> None:
    op.drop_index('ix_subs_dunning_lifting', table_name='subs_dunning')
    op.drop_index('ix_payment_retry_dispatched', table_name='payment_retry')
