"""recompute_request.touched_at and parked_touch: a dead recompute's request is passed over, not deleted.

2e8b80b deleted an account's pending request when its recompute was given up as dead, so that the
stale-request re-drive would not send it again every minute. But the delete took whatever request was
pending, also one a webhook had created or asked for again while the dying run was in flight: that
webhook's event was then never recomputed. The request now stays. ``touched_at`` says when it was last
asked for (set on insert, refreshed by every upsert that finds it); a recompute given up as dead copies
the ``touched_at`` of the version it had taken into ``parked_touch``, if no one has touched the request
since; the stale-request re-drive passes over a request while the two are equal and the account's
recompute is dead. Existing requests were last touched now as far as anyone knows, and none is parked.

Revision ID: request_touched_at
Revises: sweep_errors_before_stage
Create Date: 2026-12-01 12:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = 'request_touched_at'
down_revision: Union[str, Sequence[str], None] = 'sweep_errors_before_stage'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('recompute_request', sa.Column('touched_at', sa.DateTime(timezone=True),
                                                 server_default=sa.text('now()'), nullable=False))
    op.add_column('recompute_request', sa.Column('parked_touch', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('recompute_request', 'parked_touch')
    op.drop_column('recompute_request', 'touched_at')
