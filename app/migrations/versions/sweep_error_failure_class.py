"""sweep_error.failure_class: the failure class (tasks/failures.py) of a sweep that failed.

A sweep that fails (kind ``failed``) now says why, by class: a database or broker connection error or
lock contention that outlasted its retries (``database_unavailable``, ``broker_unavailable``,
``lock_contention``), or one that never retries (``invalid_data``, ``unexpected``: a bug). NULL for
the other kinds (an account's error, a page's requests) and for the rows written before.

Revision ID: sweep_error_failure_class
Revises: unroutable_routing_cursor
Create Date: 2026-12-01 17:10:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'sweep_error_failure_class'
down_revision: str | Sequence[str] | None = 'unroutable_routing_cursor'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('sweep_error', sa.Column('failure_class', sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column('sweep_error', 'failure_class')
