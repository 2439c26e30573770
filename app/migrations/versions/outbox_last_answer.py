"""outbox: each row's last answer (its HTTP status), when Account Management first refused it as
wrong (``blocked_at``), and how it ended (``state``).

A row Account Management answers with a 4xx other than 408/429 (the request itself is wrong: an
account it does not know) was retried with backoff for ever and, rows of one account going in
order, held back every later row of that account, seen only as a growing backlog. The status is
now kept beside the error text, a refused row counts as blocked (gauge dunning_outbox_blocked),
and an operator may skip it (`dunning outbox skip`): the row stays, in state ``skipped``.

``state`` of the existing rows: added with the default 'delivered' (no rewrite of the delivered
history), then the undelivered rows (the partial index finds them) are made 'pending' and the
superseded ones (their reason is in last_error) 'superseded', and those the audit log says were
skipped (before a downgrade) 'skipped'; new rows default to 'pending'.

Revision ID: outbox_last_answer
Revises: sweep_error
Create Date: 2026-12-02 12:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = 'outbox_last_answer'
down_revision: Union[str, Sequence[str], None] = 'sweep_error'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('outbox', sa.Column('last_status', sa.Integer(), nullable=True))
    op.add_column('outbox', sa.Column('blocked_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('outbox', sa.Column('state', sa.Text(), server_default=sa.text("'delivered'"), nullable=False))
    op.execute("UPDATE outbox SET state = 'pending' WHERE delivered_at IS NULL")
    op.execute("UPDATE outbox SET state = 'superseded' WHERE delivered_at IS NOT NULL "
               "AND last_error LIKE 'superseded:%'")
    # Rows skipped before a downgrade (their audit says so): a skipped row has delivered_at set too,
    # and would read as delivered, as if Account Management had taken it.
    op.execute("UPDATE outbox SET state = 'skipped' WHERE delivered_at IS NOT NULL AND id IN "
               "(SELECT (detail->>'outbox_id')::bigint FROM audit_log WHERE action = 'outbox.skip')")
    op.alter_column('outbox', 'state', server_default=sa.text("'pending'"))


def downgrade() -> None:
    op.drop_column('outbox', 'state')
    op.drop_column('outbox', 'blocked_at')
    op.drop_column('outbox', 'last_status')
