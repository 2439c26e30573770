"""Stripe mirror rows filed under an account (account_key), so the sweep reads a range of accounts'
mirror rows with one index range scan per table instead of one index probe per customer and table.

subs_customer stays the truth of which account a customer belongs to (it is shared, and this product
never writes it). mirror_customer records, per Stripe customer, the account its mirror rows are
filed under, and this invariant holds in every committed state:

    a mirror_customer row (customer, K) exists  =>  every mirror row of that customer has account_key K

(K may be NULL: filed under no account). Mirror rows written with a stripe_customer_id get it from a
trigger; ``app.sweep.refile`` files customers again when subs_customer says otherwise. Readers that
use account_key (the sweep's batch gather) take it only where mirror_customer agrees with
subs_customer and reach every other customer through its stripe_customer_id, as before.

Concurrency: the trigger holds ROW EXCLUSIVE on mirror_customer (as any writer of it does) from
before it reads the customer's key until its transaction ends; refiling takes SHARE ROW EXCLUSIVE,
which waits for those writers and holds new ones back while it moves rows. Writers of mirror rows
must run in READ COMMITTED (each statement of the trigger then sees what committed before it);
the trigger refuses other levels rather than file a row under a stale key.

Revision ID: mirror_account_key
Revises: sweep_counts_and_gate
Create Date: 2026-11-21 15:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = 'mirror_account_key'
down_revision: Union[str, Sequence[str], None] = 'sweep_counts_and_gate'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

MIRROR_TABLES = ('stripe_invoice', 'stripe_payment_attempt', 'stripe_payment_method', 'stripe_customer_state',
                 'stripe_subscription')

FILE_ROW = """
CREATE FUNCTION dunning_file_mirror_row() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  key text;
BEGIN
  IF NEW.stripe_customer_id IS NULL THEN
    NEW.account_key := NULL;
    RETURN NEW;
  END IF;
  IF current_setting('transaction_isolation') <> 'read committed' THEN
    RAISE EXCEPTION 'Stripe mirror rows are written in READ COMMITTED transactions (this one is %)',
      current_setting('transaction_isolation');
  END IF;
  -- Before reading the key: a refile (SHARE ROW EXCLUSIVE) in progress is waited for, and none
  -- starts until this transaction ends.
  LOCK TABLE mirror_customer IN ROW EXCLUSIVE MODE;
  SELECT m.account_key INTO key FROM mirror_customer m WHERE m.stripe_customer_id = NEW.stripe_customer_id;
  IF NOT FOUND THEN
    -- The customer's first mirror row: file it under the account subs_customer names now (NULL if
    -- none yet). A concurrent first row of the same customer waits on the unique key and reads
    -- the key this one files.
    INSERT INTO mirror_customer (stripe_customer_id, account_key)
    VALUES (NEW.stripe_customer_id,
            (SELECT c.account_id FROM subs_customer c WHERE c.stripe_customer_id = NEW.stripe_customer_id))
    ON CONFLICT (stripe_customer_id) DO NOTHING;
    SELECT m.account_key INTO key FROM mirror_customer m WHERE m.stripe_customer_id = NEW.stripe_customer_id;
  END IF;
  NEW.account_key := key;
  RETURN NEW;
END
$$
"""


def upgrade() -> None:
    op.create_table(
        'mirror_customer',
        sa.Column('stripe_customer_id', sa.Text(), nullable=False),
        sa.Column('account_key', sa.Text(), nullable=True),
        sa.Column('filed_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.PrimaryKeyConstraint('stripe_customer_id', name=op.f('pk_mirror_customer')),
    )
    op.create_index('ix_mirror_customer_account_key', 'mirror_customer', ['account_key', 'stripe_customer_id'])
    for table in MIRROR_TABLES:
        op.add_column(table, sa.Column('account_key', sa.Text(), nullable=True))
    # Rows already mirrored: filed under the account subs_customer names now.
    op.execute("""
        INSERT INTO mirror_customer (stripe_customer_id, account_key)
        SELECT x.stripe_customer_id, c.account_id
          FROM (SELECT stripe_customer_id FROM subs_customer
                UNION SELECT stripe_customer_id FROM stripe_invoice
                UNION SELECT stripe_customer_id FROM stripe_payment_attempt
                UNION SELECT stripe_customer_id FROM stripe_payment_method
                UNION SELECT stripe_customer_id FROM stripe_customer_state
                UNION SELECT stripe_customer_id FROM stripe_subscription) x
          LEFT JOIN subs_customer c USING (stripe_customer_id)
         WHERE x.stripe_customer_id IS NOT NULL
    """)
    for table in MIRROR_TABLES:
        op.execute(f"UPDATE {table} t SET account_key = m.account_key FROM mirror_customer m "
                   f"WHERE m.stripe_customer_id = t.stripe_customer_id")
        op.create_index(f'ix_{table}_account_key', table, ['account_key'])
    op.execute(FILE_ROW)
    for table in MIRROR_TABLES:
        op.execute(f"CREATE TRIGGER file_mirror_row BEFORE INSERT ON {table} "
                   f"FOR EACH ROW EXECUTE FUNCTION dunning_file_mirror_row()")
        op.execute(f"CREATE TRIGGER file_mirror_row_again BEFORE UPDATE OF stripe_customer_id ON {table} "
                   f"FOR EACH ROW WHEN (OLD.stripe_customer_id IS DISTINCT FROM NEW.stripe_customer_id) "
                   f"EXECUTE FUNCTION dunning_file_mirror_row()")


def downgrade() -> None:
    for table in MIRROR_TABLES:
        op.execute(f"DROP TRIGGER file_mirror_row_again ON {table}")
        op.execute(f"DROP TRIGGER file_mirror_row ON {table}")
        op.drop_index(f'ix_{table}_account_key', table_name=table)
        op.drop_column(table, 'account_key')
    op.execute("DROP FUNCTION dunning_file_mirror_row()")
    op.drop_index('ix_mirror_customer_account_key', table_name='mirror_customer')
    op.drop_table('mirror_customer')
