"""outbox: rows a 409 blocked at once (before 7f7a99a) follow the lasting-conflict rule.

Until 7f7a99a a 409 was refused as wrong and blocked its row at its first answer. Since then a 409
is "not now" (usually a retry meeting its first request, under the same Idempotency-Key, still under
way), and since 88fec8c (outbox_conflict_since) it blocks only once the row has been answered 409 for
over 1 h since the first 409 of its streak (outbox.conflict_since). ``blocked_at`` stays from a
row's first refusal on, so a row a 409 blocked before stayed blocked whatever the rule says: counted
in dunning_outbox_blocked, listed by `dunning outbox list --blocked` for an operator to skip (a
request that would go through), and, a cancellation sent without an answer, superseded later without
saying that Account Management may have acted on it.

Such a row is undelivered, blocked, its last answer a 409 and its conflict_since empty (the relay
sets conflict_since with every 409 since 88fec8c). Its streak began at its block (that 409), as far
as is known, and ``conflict_since`` says so now. A block less than 1 h old is lifted: the row is
retried as "not now" and blocks again only if the 409s go on past the hour. An older one stays: the
new rule blocks it too (a 409 streak of over 1 h), and its reason says so as the relay writes it
(``409 for over 1 h: a lasting conflict; HTTP 409: ...``). A row first refused otherwise (a 404) and
answered 409 since reads the same; its block, the first refusal, was taken for the first 409.

Downgrade changes nothing back: the code before blocks such a row again at its next 409.

Revision ID: outbox_conflicts_blocked_before
Revises: subscription_prev_products
Create Date: 2026-12-01 22:10:00

"""
from collections.abc import Sequence

from alembic import op

revision: str = 'outbox_conflicts_blocked_before'
down_revision: str | Sequence[str] | None = 'subscription_prev_products'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As app/outbox/answers.py has them at this revision (a migration does not follow later code).
LASTING_CONFLICT = "1 hour"
LASTING_CONFLICT_NOTE = "409 for over 1 h: a lasting conflict"
ERROR_LIMIT = 2000  # characters of last_error kept (app/outbox/relay.py)

BLOCKED_BY_A_409 = ("delivered_at IS NULL AND blocked_at IS NOT NULL AND last_status = 409 "
                    "AND conflict_since IS NULL")


def upgrade() -> None:
    op.execute(f"""
        UPDATE outbox SET conflict_since = blocked_at,
               blocked_at = CASE WHEN blocked_at >= now() - interval '{LASTING_CONFLICT}' THEN NULL
                                 ELSE blocked_at END,
               last_error = CASE WHEN blocked_at >= now() - interval '{LASTING_CONFLICT}' THEN last_error
                                 ELSE left('{LASTING_CONFLICT_NOTE}; ' || coalesce(last_error, 'HTTP 409'),
                                           {ERROR_LIMIT}) END
         WHERE {BLOCKED_BY_A_409}
    """)


def downgrade() -> None:
    pass
