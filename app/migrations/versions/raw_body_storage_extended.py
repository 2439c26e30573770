"""Stripe events' raw bodies back to STORAGE EXTENDED (undoes stripe_event_lean_writes' MAIN).

With the raw body MAIN, PostgreSQL's toaster first moves every other text column of the row longer
than a TOAST pointer out of line (the phases that compress and move EXTENDED columns run before it
compresses a MAIN one, while the row still holds the uncompressed body): a Stripe event id (28
characters, `evt_...`) went to the TOAST table on every webhook, one chunk of its own, and reading
the id back read the TOAST table. EXTENDED compresses the body first and moves it, alone, when it is
still too large. The partial indexes of stripe_event_lean_writes stay.

Revision ID: raw_body_storage_extended
Revises: attempt_chargeless_facts
Create Date: 2026-12-01 07:10:00

"""
from typing import Sequence, Union

from alembic import op

revision: str = 'raw_body_storage_extended'
down_revision: Union[str, Sequence[str], None] = 'attempt_chargeless_facts'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.execute("ALTER TABLE stripe_event ALTER COLUMN raw_body SET STORAGE EXTENDED")


def downgrade() -> None:
    op.execute("ALTER TABLE stripe_event ALTER COLUMN raw_body SET STORAGE MAIN")
