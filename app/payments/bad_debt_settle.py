"""Settle a bad-debt payment whose charge succeeded: pay its invoices out of band at Stripe.

The PaymentIntent took the money outside any invoice, so each invoice it covers is marked paid out
of band (``POST /v1/invoices/<id>/pay`` with ``paid_out_of_band``; one idempotency key per payment
and invoice, so a re-run never pays twice). The invoices Stripe returns are written to the mirror
through the same guarded upsert as webhooks, and the payment becomes ``succeeded`` in that same
transaction: the next recompute sees the debt paid and the account leaves bad debt (exit "paid").
Stripe's own invoice.paid webhooks arrive later and change nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import stripe
from sqlalchemy.exc import SQLAlchemyError

from app.db import unit_of_work
from app.domain.triggers import Trigger
from app.payments.stripe_client import make_stripe_client
from app.runtime import Runtime

log = logging.getLogger(__name__)

SETTLED_STATUSES = ("paid", "void")

LOAD = """
SELECT b.account_id, b.state, b.invoice_ids, b.amount, b.stripe_payment_intent_id, a.status AS charge_status
  FROM bad_debt_payment b LEFT JOIN stripe_payment_attempt a ON a.id = b.stripe_payment_intent_id
 WHERE b.id = %(id)s
"""
MARK_SUCCEEDED = """
UPDATE bad_debt_payment SET state = 'succeeded', failure_reason = NULL, updated_at = now()
 WHERE id = %(id)s AND state IN ('pending', 'failed')
"""
# Settled: pending, or failed when its charge succeeded all the same (a payment the reconciliation
# with Stripe found no intent for, whose intent turned up later): the customer's money pays the debt.
SETTLEABLE = ("pending", "failed")
# Settleable payments whose charge the mirror shows succeeded a while ago: settlement that was never
# queued (broker down at ingest) or whose task was lost.
UNSETTLED = """
SELECT b.id FROM bad_debt_payment b JOIN stripe_payment_attempt a ON a.id = b.stripe_payment_intent_id
 WHERE b.state IN ('pending', 'failed') AND a.status = 'succeeded'
   AND b.updated_at < now() - make_interval(secs => %(age)s)
 ORDER BY b.id LIMIT %(limit)s
"""


class NotSettled(Exception):
    """Stripe refused to mark an invoice paid and it is not paid or void either."""


@dataclass(frozen=True)
class Settlement:
    payment_id: int
    account_id: str | None
    outcome: str  # settled | already_done | not_charged | unknown_payment
    invoices: tuple[str, ...] = ()
    enqueue: bool = False
    # Invoices paid or voided some other way while this payment ran: the customer paid them twice.
    settled_elsewhere: tuple[str, ...] = ()
    amount: int = 0


SENDING = """
UPDATE bad_debt_payment SET settle_sent = jsonb_set(settle_sent, ARRAY[%(invoice)s],
                                                   to_jsonb(COALESCE((settle_sent->>%(invoice)s)::int, 0) + 1))
 WHERE id = %(id)s
RETURNING (settle_sent->>%(invoice)s)::int - 1
"""


def _pay_out_of_band(rt: Runtime, client: stripe.StripeClient, payment_id: int,
                     invoice_id: str) -> tuple[dict[str, Any], bool]:
    """-> (Stripe's invoice, whether this payment settled it).

    Each call is on record before it is sent, so an invoice found settled can be told apart:
    settled before this payment ever asked (the customer paid it some other way meanwhile, or it
    was voided: paid twice), or after (this payment's own earlier call, whose answer was lost). A
    call after a 5xx gets a new idempotency key: Stripe replays a 5xx for the key's 24 hours.
    """
    with unit_of_work(rt.engine) as conn:
        sent_before = int(conn.exec_driver_sql(SENDING, {"invoice": invoice_id, "id": payment_id}).scalar_one())
    key = f"bad-debt-settle-{payment_id}-{invoice_id}" + (f"-{sent_before}" if sent_before else "")
    try:
        invoice = client.v1.invoices.pay(invoice_id, {"paid_out_of_band": True}, {"idempotency_key": key})
        ours = True
    except stripe.InvalidRequestError as exc:
        # Already paid or voided, or Stripe refuses: how does the invoice stand?
        invoice = client.v1.invoices.retrieve(invoice_id)
        if invoice.status not in SETTLED_STATUSES:
            raise NotSettled(f"Stripe refused to pay invoice {invoice_id} out of band "
                             f"(status {invoice.status})") from exc
        ours = sent_before > 0
    except (stripe.APIError, stripe.APIConnectionError):
        # The call may have run: if the invoice is settled now, this call settled it.
        invoice = client.v1.invoices.retrieve(invoice_id)
        if invoice.status not in SETTLED_STATUSES:
            raise  # not run: the task retries, with a new key
        ours = True
    result: dict[str, Any] = invoice.to_dict(for_json=True)
    return result, ours


def mirror_rows(event_type: str, source: str, obj: dict[str, Any]) -> list[Any]:
    """An API object Stripe returned, mapped by the webhook mirror's own code (same columns, same
    ordering guard) as if it came in an event of ``event_type``, stamped now."""
    from webhooks.mirror import extract

    envelope = {"object": "event", "id": f"{source}_{obj['id']}", "type": event_type,
                "created": int(time.time()), "data": {"object": obj}}
    return list(extract(envelope).rows)


def settle(rt: Runtime, payment_id: int) -> Settlement:
    """Raises stripe errors (the task classifies them) and NotSettled."""
    from webhooks.store import request_recompute, upsert_row

    with rt.engine.connect() as conn:
        row = conn.exec_driver_sql(LOAD, {"id": payment_id}).mappings().first()
    if row is None:
        return Settlement(payment_id, None, "unknown_payment")
    account_id = str(row["account_id"])
    if row["state"] not in SETTLEABLE:
        return Settlement(payment_id, account_id, "already_done")
    if row["charge_status"] != "succeeded":
        # Only money Stripe confirmed (through a signed webhook in the mirror) settles a debt.
        return Settlement(payment_id, account_id, "not_charged")
    client = make_stripe_client(rt.settings)
    paid = [_pay_out_of_band(rt, client, payment_id, str(inv)) for inv in row["invoice_ids"] or []]
    with unit_of_work(rt.engine) as conn:
        # The request row, the mirror rows, then the payment row: the order webhook ingest locks
        # them in (its statement, then record_outcome), so the two cannot deadlock.
        created = request_recompute(conn, account_id, Trigger.BAD_DEBT_PAID.value, f"bad_debt_payment:{payment_id}")
        for invoice, _ in paid:
            for mirror_row in mirror_rows("invoice.paid", f"bad_debt_settle_{payment_id}", invoice):
                upsert_row(conn, mirror_row)
        conn.exec_driver_sql(MARK_SUCCEEDED, {"id": payment_id})
    elsewhere = tuple(str(invoice["id"]) for invoice, ours in paid if not ours)
    if elsewhere:
        log.error("bad-debt payment %s of %s for %s covered invoice(s) %s already settled some other way: "
                  "the customer paid them twice", payment_id, row["amount"], account_id, ", ".join(elsewhere))
    log.info("bad-debt payment %s settled %d invoice(s) for %s", payment_id, len(paid), account_id)
    return Settlement(payment_id, account_id, "settled", tuple(str(i["id"]) for i, _ in paid), enqueue=created,
                      settled_elsewhere=elsewhere, amount=int(row["amount"]))


def account_of(rt: Runtime, payment_id: int) -> str | None:
    """The payment's account, for recording a failure under it (None if unknown or unreadable)."""
    try:
        with rt.engine.connect() as conn:
            found = conn.exec_driver_sql("SELECT account_id FROM bad_debt_payment WHERE id = %(id)s",
                                         {"id": payment_id}).scalar()
    except SQLAlchemyError:  # the database may be what failed: the failure is recorded without it
        return None
    return str(found) if found is not None else None


def unsettled(rt: Runtime, older_than_seconds: float = 60.0, limit: int = 100) -> list[int]:
    with rt.engine.connect() as conn:
        return [int(r[0]) for r in conn.exec_driver_sql(UNSETTLED, {"age": older_than_seconds, "limit": limit})]
