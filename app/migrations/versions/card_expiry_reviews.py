"""A card's expiry is a review moment: decisions stored before are given theirs.

compute now stores each attached card's expiry instant (a card is valid through the last day of its
expiry month, UTC) among its review moments (``subs_dunning.next_review_at``): the mandate turns
``expired`` then, and a plan made on the card no longer holds, with no Stripe event to recompute the
account. A decision stored before has no such moment: a current account with no events kept showing
``usable`` in subs_mandate for a card expired long ago, and one whose card expires later would again.

From subs_mandate (what the last recompute saw of each card; a detached or expired one is no review
moment): an account with a card already expired but stored as anything else (``usable``, ``blocked``,
``needs_action``) is due for review now, once; an account whose cards are all still valid gets the
earliest expiry as its review, unless an earlier review is stored. Each recompute then stores its own
next review. Batches of accounts, each its own transaction (most accounts have a card: one statement
would hold every subs_dunning row it updates, and every recompute writing one, until the end).

Revision ID: card_expiry_reviews
Revises: periodic_scans
Create Date: 2026-12-01 17:00:00

"""
from collections.abc import Sequence

from alembic import op

revision: str = 'card_expiry_reviews'
down_revision: str | Sequence[str] | None = 'periodic_scans'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 5000

# One batch of accounts (by account id, after ``after``): its first and last account (NULL: done).
PAGE = """
SELECT min(account_id), max(account_id)
  FROM (SELECT account_id FROM subs_dunning WHERE %(after)s::text IS NULL OR account_id > %(after)s
         ORDER BY account_id LIMIT %(batch)s) p
"""

# The batch's accounts (%(lo)s to %(hi)s, as values: bounds read from the page in the same statement are
# unknown when it is planned, estimated at a ninth of the table, and every batch read subs_dunning
# whole) get the review each card gives, as compute's _next_card_expiry computes it (the first month
# after (exp_year, exp_month), compared as card_expired compares them), now() for a card already expired.
REVIEW_BATCH = """
WITH month_now AS (
    SELECT extract(year FROM now() AT TIME ZONE 'UTC')::int AS y,
           extract(month FROM now() AT TIME ZONE 'UTC')::int AS m
), cards AS (
    SELECT m.account_id,
           min(CASE WHEN (m.exp_year, m.exp_month) < (n.y, n.m) THEN now()
                    WHEN m.exp_month >= 12 THEN make_timestamptz(m.exp_year + 1, 1, 1, 0, 0, 0, 'UTC')
                    ELSE make_timestamptz(m.exp_year, greatest(m.exp_month, 0) + 1, 1, 0, 0, 0, 'UTC')
               END) AS review
      FROM subs_mandate m CROSS JOIN month_now n
     WHERE m.account_id BETWEEN %(lo)s AND %(hi)s
       AND m.status NOT IN ('detached', 'expired')
       AND m.exp_year IS NOT NULL AND m.exp_month IS NOT NULL
       -- an expiry no timestamp holds is none (compute's too)
       AND ((m.exp_year, m.exp_month) < (n.y, n.m) OR m.exp_year + (m.exp_month >= 12)::int <= 9999)
     GROUP BY m.account_id
)
UPDATE subs_dunning d SET next_review_at = c.review
  FROM cards c
 WHERE d.account_id BETWEEN %(lo)s AND %(hi)s
   AND d.account_id = c.account_id AND (d.next_review_at IS NULL OR d.next_review_at > c.review)
"""


def upgrade() -> None:
    with op.get_context().autocommit_block():
        conn = op.get_bind()
        after: str | None = None
        while True:
            lo, hi = conn.exec_driver_sql(PAGE, {"after": after, "batch": BATCH}).one()
            if hi is None:
                return
            conn.exec_driver_sql(REVIEW_BATCH, {"lo": lo, "hi": hi})
            after = hi


def downgrade() -> None:
    pass  # a review moment set earlier only recomputes the account once more
