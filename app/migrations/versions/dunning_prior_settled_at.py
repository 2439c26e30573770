"""subs_dunning.prior_settled_at: where the current dunning's debts begin, whatever unpaid_since says.

DunningResolved says how the dunning ended by the debts settled in it: those settled since the stored
unpaid_since. A failure learned late (its event delivered days after it happened) dates unpaid_since
back, possibly over a void of an earlier dunning that had already closed (its DunningResolved said
"resolved"): a dunning the customer then paid in full said "resolved" too. Compute now keeps, from
the moment the account enters dunning from current until it leaves it, the latest settlement of
the debts already settled then: those belong to earlier dunnings.

Nullable, no backfill: NULL (the rows of accounts in dunning today) goes by unpaid_since alone, as
before; the next dunning sets it.

Revision ID: dunning_prior_settled_at
Revises: stripe_event_lean_writes
Create Date: 2026-12-01 07:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = 'dunning_prior_settled_at'
down_revision: Union[str, Sequence[str], None] = 'stripe_event_lean_writes'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('subs_dunning', sa.Column('prior_settled_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('subs_dunning', 'prior_settled_at')
