"""audit_log: an index on a support recompute's task id.

GET /support/tasks/<id> finds the recompute support started by the task id kept in the audit row's
detail; the support page asks every 300 ms while a recompute runs. Without an index each ask read
the whole audit log, which only grows.

Revision ID: audit_recompute_task
Revises: invoice_detail_asked
Create Date: 2026-11-30 16:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = 'audit_recompute_task'
down_revision: Union[str, Sequence[str], None] = 'invoice_detail_asked'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index('ix_audit_log_recompute_task', 'audit_log', [sa.text("(detail->>'task_id')")],
                    postgresql_where=sa.text("action = 'recompute'"))


def downgrade() -> None:
    op.drop_index('ix_audit_log_recompute_task', table_name='audit_log')
