"""outbox: the undelivered rows in id order, by a partial index.

The relay's pass picks the accounts whose oldest undelivered row is ready, oldest first (ORDER BY id).
Delivered rows are kept, so with a long history the only index in id order (the primary key) was
walked through every delivered row before the first undelivered one: 300 ms a pass at a million
delivered rows, every 5 s, growing with the history, and slowest while a backlog drains.

Revision ID: outbox_pending_by_id
Revises: audit_recompute_task
Create Date: 2026-11-30 17:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = 'outbox_pending_by_id'
down_revision: Union[str, Sequence[str], None] = 'audit_recompute_task'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index('ix_outbox_pending_by_id', 'outbox', ['id'], postgresql_where=sa.text("delivered_at IS NULL"))


def downgrade() -> None:
    op.drop_index('ix_outbox_pending_by_id', table_name='outbox')
