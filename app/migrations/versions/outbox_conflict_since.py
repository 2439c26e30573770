"""outbox.conflict_since: when Account Management first answered the row 409 in its current streak.

A 409 is "not now" (retried with backoff, never blocked): the usual one is a retry meeting its first
request, under the same Idempotency-Key, still being processed. A 409 that lasts is a conflict that
does not pass (the subscription in another workflow): retried for ever, it never showed as blocked.
A row answered 409 for longer than any request can still be under way (app/outbox/answers.py,
LASTING_CONFLICT) is now blocked; its streak starts here. NULL: no 409 in the current streak; the
existing rows' streaks start at their next 409.

Revision ID: outbox_conflict_since
Revises: retry_claim_method_mark
Create Date: 2026-12-01 20:30:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'outbox_conflict_since'
down_revision: str | Sequence[str] | None = 'retry_claim_method_mark'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('outbox', sa.Column('conflict_since', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('outbox', 'conflict_since')
