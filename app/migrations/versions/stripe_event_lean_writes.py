"""Stripe events: indexes only for the events something looks up, and raw bodies kept in the row.

Every webhook inserts a stripe_event row, so each of its indexes and its TOAST storage are paid on
the ingest path (webhooks/store.py). What reads stripe_event other than by its id:

- the unroutable re-drive (app/redrive.py ROUTE_UNROUTABLE) and the sweep's check for a customer's
  unroutable events (app/recompute/gather_batch.py): state = 'unroutable', by customer;
- the re-drive of events whose recompute could not be queued: state = 'enqueue_failed', by account.

Both look at a few rows in a given state. The full indexes on stripe_customer_id and account_id
covered every event ever received to serve them; partial indexes on just those states serve them
as well and cost an ingest nothing (an accepted event is in neither).

A raw body (4-5 KB of JSON, about 2.7 KB once lz4 has compressed it) was moved out of the row into
the TOAST table in two chunks, each a row and an index entry there. STORAGE MAIN keeps it compressed
in the row unless the row could not fit in a page otherwise. Existing rows keep their storage; both
are read alike. (Undone by raw_body_storage_extended: with the body MAIN, the toaster moved the
row's other text columns, the event id included, out of line first.)

The indexes are built and dropped CONCURRENTLY: stripe_event is the largest table and webhook ingest
writes it all the time, so a plain build's lock would hold webhooks for the length of the scan.

Revision ID: stripe_event_lean_writes
Revises: history_retention
Create Date: 2026-12-01 06:00:00

"""
from typing import Sequence, Union

from alembic import op

revision: str = 'stripe_event_lean_writes'
down_revision: Union[str, Sequence[str], None] = 'history_retention'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

NEW = {
    "ix_stripe_event_unroutable_customer": "ON stripe_event (stripe_customer_id) WHERE state = 'unroutable'",
    "ix_stripe_event_enqueue_failed": "ON stripe_event (account_id) WHERE state = 'enqueue_failed'",
}
OLD = ("ix_stripe_event_stripe_customer_id", "ix_stripe_event_account_id", "ix_stripe_event_unroutable")


def upgrade() -> None:
    op.execute("ALTER TABLE stripe_event ALTER COLUMN raw_body SET STORAGE MAIN")
    with op.get_context().autocommit_block():
        for name, definition in NEW.items():
            # A concurrent build interrupted part way leaves an invalid index of that name behind:
            # built again from the start.
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
            op.execute(f"CREATE INDEX CONCURRENTLY {name} {definition}")
        for name in OLD:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_stripe_event_stripe_customer_id "
                   "ON stripe_event (stripe_customer_id)")
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_stripe_event_account_id ON stripe_event (account_id)")
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_stripe_event_unroutable "
                   "ON stripe_event (state) WHERE state = 'unroutable'")
        for name in NEW:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
    op.execute("ALTER TABLE stripe_event ALTER COLUMN raw_body SET STORAGE EXTENDED")
