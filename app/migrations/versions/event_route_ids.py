"""stripe_event.route_invoice_id and route_payment_intent_id: what an unroutable event can be routed by
besides its customer.

An event that names no customer finds its account through the mirror at ingest: an
``invoice_payment.paid`` through its invoice, a dispute (or a charge, an intent naming no customer)
through its payment intent's attempt. When that row was not mirrored yet (the invoice's own events
came later, or in a statement that had not committed), the event was stored ``unroutable`` and stayed
so for ever: beat's re-drive (app/redrive.py ROUTE_UNROUTABLE) routed only by the event's customer,
and the stored event kept nothing else to route it by. Ingest now keeps the invoice and the payment
intent it looked up, for the events it stores unroutable only (NULL for every event it routes: no
more bytes on the common path, no index), and the re-drive routes by them once the mirror files them
under a customer that maps to an account.

Nullable, no default: no table rewrite. The events stored unroutable before are read once here
(few: they are what the partial index on the state holds) and given what their bodies name, so those
that waited for an invoice mirrored since are routed by the next re-drive.

Revision ID: event_route_ids
Revises: rollout_revision
Create Date: 2026-12-01 16:30:00

"""
import json
from collections.abc import Mapping, Sequence
from typing import Any

from alembic import op

revision: str = 'event_route_ids'
down_revision: str | Sequence[str] | None = 'rollout_revision'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 1000
UNROUTABLE = "SELECT id, raw_body FROM stripe_event WHERE state = 'unroutable' AND route_invoice_id IS NULL " \
             "AND route_payment_intent_id IS NULL"
MARK = """
UPDATE stripe_event e SET route_invoice_id = u.invoice_id, route_payment_intent_id = u.payment_intent_id
  FROM unnest(%(ids)s::text[], %(invoices)s::text[], %(intents)s::text[]) AS u(id, invoice_id, payment_intent_id)
 WHERE e.id = u.id AND e.state = 'unroutable'
"""


def upgrade() -> None:
    op.execute("ALTER TABLE stripe_event ADD COLUMN IF NOT EXISTS route_invoice_id text, "
               "ADD COLUMN IF NOT EXISTS route_payment_intent_id text")
    # After the columns are committed (ADD COLUMN holds stripe_event's exclusive lock to the end of
    # its transaction, and every webhook writes stripe_event); each batch its own transaction.
    with op.get_context().autocommit_block():
        conn = op.get_bind()
        found = []
        for event_id, body in conn.exec_driver_sql(UNROUTABLE):
            invoice, intent = _route_ids(body)
            if invoice is not None or intent is not None:
                found.append((event_id, invoice, intent))
        for start in range(0, len(found), BATCH):
            batch = found[start:start + BATCH]
            conn.exec_driver_sql(MARK, {"ids": [b[0] for b in batch], "invoices": [b[1] for b in batch],
                                        "intents": [b[2] for b in batch]})


def downgrade() -> None:
    op.execute("ALTER TABLE stripe_event DROP COLUMN IF EXISTS route_payment_intent_id, "
               "DROP COLUMN IF EXISTS route_invoice_id")


def _id(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("id"), str):
        return str(value["id"])
    return None


def _route_ids(body: str) -> tuple[str | None, str | None]:
    """The invoice and payment intent an event's body names, as webhooks/mirror.py extract reads them
    at this revision (read here, not imported: a migration must not change with later code). Python
    parses every body ingest took (NaN included), where a jsonb cast would stop the migration."""
    try:
        event: Any = json.loads(body)
    except ValueError:
        return None, None
    data = event.get("data") if isinstance(event, Mapping) else None
    obj = data.get("object") if isinstance(data, Mapping) else None
    if not isinstance(obj, Mapping):
        return None, None
    kind, event_type = obj.get("object"), event.get("type")
    if kind == "invoice_payment":
        payment = obj.get("payment")
        return _id(obj.get("invoice")), _id(payment.get("payment_intent")) if isinstance(payment, Mapping) else None
    if kind == "invoice" and isinstance(event_type, str) and event_type.startswith("invoice."):
        return (_id(obj.get("id")) if _id(obj.get("customer")) else None), None
    if kind == "charge" or (kind == "dispute" and isinstance(event_type, str)
                            and event_type.startswith("charge.dispute.")):
        return None, _id(obj.get("payment_intent"))
    if kind == "payment_intent":
        return None, _id(obj.get("id"))
    return None, None
