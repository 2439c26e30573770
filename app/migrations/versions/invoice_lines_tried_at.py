"""stripe_invoice.lines_tried_at: when beat last asked Stripe for an incomplete invoice's lines.

Beat's pass (tasks.fetch_invoice_lines, app/payments/invoice_lines.py) took the incomplete invoices
ordered by ``lines_asked_at``, which only a refusal (a 4xx about the invoice) set: an invoice that
kept failing otherwise (a 5xx, an answer that could not be read) sorted first again every pass, and
with more such invoices than a pass takes no other one was ever asked. Every ask is noted here now
and the pass takes the least recently asked first (never asked: first of all). Nullable, no default:
no table rewrite; the rows of today are all "never asked".

Revision ID: invoice_lines_tried_at
Revises: invoice_lines_incomplete
Create Date: 2026-12-01 12:00:00

"""
from collections.abc import Sequence

from alembic import op

revision: str = 'invoice_lines_tried_at'
down_revision: str | Sequence[str] | None = 'invoice_lines_incomplete'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE stripe_invoice ADD COLUMN IF NOT EXISTS lines_tried_at timestamp with time zone")


def downgrade() -> None:
    op.drop_column('stripe_invoice', 'lines_tried_at')
