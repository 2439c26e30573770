"""rollout_state.revision and stage_revision, rollout_history.revision, drift_record.stage_revision: stage visits.

A change was a compare-and-set on the stage's name (from_stage): a rollout that left 10% and came
back to it still took an advance decided "from 10" on the earlier visit (an operator's stale
command), skipping the soak of the new visit. Every audited change (advance, rollback, hold,
resume, naming accounts) now adds one to ``revision``; ``stage_revision`` is the revision the
current stage visit began at (a stage change, or a naming that restarted the named stage); each
rollout_history row keeps the revision its change made (NULL for the rows before this migration).
A change that names the revision it was decided at is made only at that revision.

The sweep's records were tied to the stage by name too: drift_record.stage now has the visit's
stage_revision beside it (NULL for the rows before, which the gate still reads by name), so the
remediations a page requested on an earlier visit of the stage never count in a later visit's
health; its errors compare the visit the same way (sweep_error.before_stage).

Revision ID: rollout_revision
Revises: invoice_lines_tried_at
Create Date: 2026-12-01 16:00:00

"""
from collections.abc import Sequence

from alembic import op

revision: str = 'rollout_revision'
down_revision: str | Sequence[str] | None = 'invoice_lines_tried_at'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A constant default: no table rewrite (one row, and rollout_history is small, but still).
    op.execute("ALTER TABLE rollout_state ADD COLUMN IF NOT EXISTS revision bigint NOT NULL DEFAULT 0")
    op.execute("ALTER TABLE rollout_state ADD COLUMN IF NOT EXISTS stage_revision bigint NOT NULL DEFAULT 0")
    op.execute("ALTER TABLE rollout_history ADD COLUMN IF NOT EXISTS revision bigint")
    op.execute("ALTER TABLE drift_record ADD COLUMN IF NOT EXISTS stage_revision bigint")


def downgrade() -> None:
    op.drop_column('drift_record', 'stage_revision')
    op.drop_column('rollout_history', 'revision')
    op.drop_column('rollout_state', 'stage_revision')
    op.drop_column('rollout_state', 'revision')
