"""Stripe events' raw bodies compressed with lz4 instead of pglz.

A raw body is a few kilobytes of JSON, so PostgreSQL compresses it on every webhook; pglz took
about a twelfth of the ingest statement's time, lz4 a small part of that. Existing rows keep their
pglz values (both are read transparently). A server built without lz4 keeps pglz: the column works
the same, only slower to write.

Revision ID: raw_body_lz4
Revises: mirror_account_key
Create Date: 2026-11-29 14:10:00

"""
from typing import Sequence, Union

from alembic import op

revision: str = 'raw_body_lz4'
down_revision: Union[str, Sequence[str], None] = 'mirror_account_key'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.execute("""
        DO $$
        BEGIN
            ALTER TABLE stripe_event ALTER COLUMN raw_body SET COMPRESSION lz4;
        EXCEPTION WHEN feature_not_supported THEN
            RAISE NOTICE 'lz4 is not available in this PostgreSQL build; raw bodies stay pglz';
        END
        $$
    """)


def downgrade() -> None:
    op.execute("ALTER TABLE stripe_event ALTER COLUMN raw_body SET COMPRESSION pglz")
