"""sweep_error: each drift sweep error, with the account it was about, so the gate counts accounts.

The rollout gate summed sweep_run.errors over the sweeps in its window. One account whose stored row
cannot be read, or whose compute always fails, is one error in every sweep (every 15 minutes): alone
it passed max_errors within two hours and stepped the rollout back, stage after stage, down to off,
although the remediation was sound for every other account. Each error is now a row: the account it
was about (unique per sweep), or none for an error not about one account (a page whose recompute
requests could not be stored, a sweep that failed); the gate counts distinct accounts plus those.
``before_stage`` is set on every row when the rollout stage changes (as sweep_run.errors_before_stage
is): a new stage starts its health afresh. Errors of existing sweeps are not rewritten as rows: a
stage's health counts them from this revision on only.

Revision ID: sweep_error
Revises: outbox_pending_by_id
Create Date: 2026-12-02 09:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = 'sweep_error'
down_revision: Union[str, Sequence[str], None] = 'outbox_pending_by_id'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'sweep_error',
        sa.Column('id', sa.BigInteger(), nullable=False),
        sa.Column('sweep_id', sa.BigInteger(), nullable=False),
        sa.Column('account_id', sa.Text(), nullable=True),
        sa.Column('kind', sa.Text(), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('before_stage', sa.Boolean(), server_default=sa.text('false'), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_sweep_error')),
    )
    op.create_index('uq_sweep_error_account', 'sweep_error', ['sweep_id', 'account_id'], unique=True)
    # The gate's read (this stage's errors in its window) and the stage change's update.
    op.create_index('ix_sweep_error_in_stage', 'sweep_error', ['at'], postgresql_where=sa.text('NOT before_stage'))


def downgrade() -> None:
    op.drop_index('ix_sweep_error_in_stage', table_name='sweep_error')
    op.drop_index('uq_sweep_error_account', table_name='sweep_error')
    op.drop_table('sweep_error')
