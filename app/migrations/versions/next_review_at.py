"""subs_dunning.next_review_at: when time alone would change an account's decision.

Levels go by days unpaid (3, 7, 14, 21 by default), but a recompute ran only on an event: an
account whose card was declined as permanent (no retries, so no more events) stayed at `notice`
for ever, and one whose last transient retry failed on day 14 never reached day 21's suspension.
Compute now says when its decision would next change with no new event, and beat recomputes the
accounts that are due. Every account in dunning now is due at once (one recompute each, which
sets its own next review); the others have none until they enter dunning.

Revision ID: next_review_at
Revises: default_method_changed_at
Create Date: 2026-11-30 05:30:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = 'next_review_at'
down_revision: Union[str, Sequence[str], None] = 'default_method_changed_at'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('subs_dunning', sa.Column('next_review_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index(op.f('ix_subs_dunning_next_review_at'), 'subs_dunning', ['next_review_at'], unique=False)
    op.execute("UPDATE subs_dunning SET next_review_at = now() WHERE status <> 'current'")


def downgrade() -> None:
    op.drop_index(op.f('ix_subs_dunning_next_review_at'), table_name='subs_dunning')
    op.drop_column('subs_dunning', 'next_review_at')
