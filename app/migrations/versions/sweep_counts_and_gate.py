"""drift sweep counts and cursor, drift skip reason, last rollout-gate decision

Revision ID: sweep_counts_and_gate
Revises: 0001
Create Date: 2026-11-21 14:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = 'sweep_counts_and_gate'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # A sweep is split into tasks chained by cursor; updated_at is its heartbeat.
    op.add_column('sweep_run', sa.Column('in_stage', sa.BigInteger(), server_default='0', nullable=False))
    op.add_column('sweep_run', sa.Column('guarded', sa.BigInteger(), server_default='0', nullable=False))
    op.add_column('sweep_run', sa.Column('errors', sa.BigInteger(), server_default='0', nullable=False))
    op.add_column('sweep_run', sa.Column('cursor', sa.Text(), nullable=True))
    op.add_column('sweep_run', sa.Column('note', sa.Text(), nullable=True))
    op.add_column('sweep_run', sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                                         nullable=False))
    op.create_index('ix_sweep_run_state', 'sweep_run', ['state'], unique=False)
    # Why a drifted account was not remediated: out_of_stage | guarded:<why> | dry_run | error
    op.add_column('drift_record', sa.Column('skipped', sa.Text(), nullable=True))
    op.create_index('ix_drift_record_found_at', 'drift_record', ['found_at'], unique=False)
    op.add_column('rollout_state', sa.Column('last_gate_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('rollout_state', sa.Column('last_gate_action', sa.Text(), nullable=True))
    op.add_column('rollout_state', sa.Column('last_gate_reason', sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column('rollout_state', 'last_gate_reason')
    op.drop_column('rollout_state', 'last_gate_action')
    op.drop_column('rollout_state', 'last_gate_at')
    op.drop_index('ix_drift_record_found_at', table_name='drift_record')
    op.drop_column('drift_record', 'skipped')
    op.drop_index('ix_sweep_run_state', table_name='sweep_run')
    op.drop_column('sweep_run', 'updated_at')
    op.drop_column('sweep_run', 'note')
    op.drop_column('sweep_run', 'cursor')
    op.drop_column('sweep_run', 'errors')
    op.drop_column('sweep_run', 'guarded')
    op.drop_column('sweep_run', 'in_stage')
