"""sweep_run.errors_before_stage: the part of a sweep's errors that belongs to an earlier rollout stage.

sweep_run.errors is the running total of a whole sweep. The rollout gate summed it over the sweeps
active since the stage began, so a sweep running across a stage change brought its earlier errors
into the new stage: errors that had stepped the gate back stepped it back again once resumed. Every
stage change now copies each sweep's errors here, and the gate counts only the errors beyond. Existing
sweeps start at 0 (counted as before, until the next stage change).

Revision ID: sweep_errors_before_stage
Revises: invoices_paid_before
Create Date: 2026-12-01 09:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = 'sweep_errors_before_stage'
down_revision: Union[str, Sequence[str], None] = 'invoices_paid_before'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('sweep_run', sa.Column('errors_before_stage', sa.BigInteger(), server_default='0',
                                         nullable=False))


def downgrade() -> None:
    op.drop_column('sweep_run', 'errors_before_stage')
