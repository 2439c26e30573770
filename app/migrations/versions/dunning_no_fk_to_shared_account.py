"""subs_dunning no longer references subs_account by a foreign key: our table must not block the owner's writes.

subs_account belongs to Account Management (DESIGN section 2). ``fk_subs_dunning_account_id_subs_account``
(no ON DELETE) made PostgreSQL refuse the owner's DELETE of an account, or its update of
``account_id``, as soon as a recompute had written the account's dunning row: another team's write
failed because of this product's table. ON DELETE CASCADE would have deleted our dunning history
silently instead. The row stays (like the outbox, episodes and retries, which never had a foreign
key): a recompute of an account that is gone ends as AccountNotFound (a dead stuck row) and the API
answers 404.

Dropping the constraint locks subs_account too (its triggers go with it): a short lock_timeout makes
the migration fail and be run again rather than queue behind a long transaction on the owner's
table and hold every write to it meanwhile. IF EXISTS: where the shared tables were created by their
owners, the constraint may never have existed.

Downgrade changes nothing back: the constraint is what blocked the owner's writes, and rows of
accounts deleted since would refuse it.

Revision ID: dunning_no_fk_to_shared_account
Revises: payment_method_prev_card
Create Date: 2026-12-01 22:30:00

"""
from collections.abc import Sequence

from alembic import op

revision: str = 'dunning_no_fk_to_shared_account'
down_revision: str | Sequence[str] | None = 'payment_method_prev_card'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute("ALTER TABLE subs_dunning DROP CONSTRAINT IF EXISTS fk_subs_dunning_account_id_subs_account")
    op.execute("SET LOCAL lock_timeout TO DEFAULT")


def downgrade() -> None:
    pass
