"""Support sessions ended by signing out, so that a copy of the cookie ends with them.

The support session is a signed cookie (app/support/auth.py): nothing on the server knew it, so
signing out only dropped the browser's copy. A row here, by the session's random id, refuses the
session on every request. Rows are kept only while the session could still be in its 12 hours.

Revision ID: support_session_ended
Revises: dunning_prior_settled_at
Create Date: 2026-12-01 07:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = 'support_session_ended'
down_revision: Union[str, Sequence[str], None] = 'dunning_prior_settled_at'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'support_session_ended',
        sa.Column('session_id', sa.Text(), nullable=False),
        sa.Column('ended_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.PrimaryKeyConstraint('session_id', name=op.f('pk_support_session_ended')),
    )


def downgrade() -> None:
    op.drop_table('support_session_ended')
