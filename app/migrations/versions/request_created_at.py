"""recompute_request.created_at: a drift remediation's request asked for by the sweep alone is known.

A DRIFT_DETECTED recompute requested by the drift sweep runs after a rollback or a step back of the
rollout all the same (queued, or deferred by a broker that refused it and sent by the re-drive
later): remediation went on outside the stage. The run now looks at the stage again when the request
it takes is the sweep's and nobody else asked for the account since (an upsert refreshes
``touched_at``; ``created_at`` never changes after the insert, so the two are equal only for a request
no one touched). Existing requests get the time of this migration, later than their ``touched_at``:
taken as asked for by someone else, they recompute as before.

Revision ID: request_created_at
Revises: outbox_prunable_by_age
Create Date: 2026-12-02 01:00:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'request_created_at'
down_revision: str | Sequence[str] | None = 'outbox_prunable_by_age'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # now() is stable: PostgreSQL stores it once as the existing rows' value, no table rewrite.
    op.add_column('recompute_request', sa.Column('created_at', sa.DateTime(timezone=True),
                                                 server_default=sa.text('now()'), nullable=False))


def downgrade() -> None:
    op.drop_column('recompute_request', 'created_at')
