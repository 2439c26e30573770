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
from sqlalchemy import Connection

from app.db import session_lock, unit_of_work
from app.domain.triggers import Trigger
from app.money import money
from app.payments.alerts import raise_alert
from app.payments.stripe_client import KEY_REFUSED, make_stripe_client
from app.runtime import Runtime

log = logging.getLogger(__name__)

SETTLED_STATUSES = ("paid", "void")

LOAD = """
SELECT b.account_id, b.state, b.invoice_ids, b.invoices_paid_before, b.invoices_quoted, b.settle_sent, b.amount,
       b.currency, b.stripe_payment_intent_id,
       a.status AS charge_status, a.amount_refunded
  FROM bad_debt_payment b LEFT JOIN stripe_payment_attempt a ON a.id = b.stripe_payment_intent_id
 WHERE b.id = %(id)s
"""
# The payment row locked, then (a statement of its own, so a fresh snapshot) what its charge's
# refunds are by now: a refund's webhook locks the same row before it looks at the payment's state.
LOCK_PAYMENT = "SELECT 1 FROM bad_debt_payment WHERE id = %(id)s FOR UPDATE"
REFUNDED_NOW = """
SELECT a.amount_refunded FROM bad_debt_payment b JOIN stripe_payment_attempt a ON a.id = b.stripe_payment_intent_id
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
 WHERE b.state IN ('pending', 'failed') AND a.status = 'succeeded' AND a.amount_refunded = 0
   AND b.updated_at < now() - make_interval(secs => %(age)s)
   -- one whose settlement an operator must look at first (refused for good) is not sent again and
   -- again, ahead of the others; re-driving its stuck row brings it back. Its arguments contain the
   -- payment's (tasks.failures.resolve_stuck): a run killed after it had waited its turn keeps
   -- {payment_id, waited}
   AND NOT EXISTS (SELECT 1 FROM subs_stuck_events s
                    WHERE s.task_name = 'tasks.settle_bad_debt_payment' AND s.state = 'dead'
                      AND s.task_args @> jsonb_build_object('payment_id', b.id))
 ORDER BY b.id LIMIT %(limit)s
"""


ACCOUNT = "SELECT account_id FROM bad_debt_payment WHERE id = %(id)s"
# The accounts other than the payment's that own its invoices now (another team moved the customer
# since the payment was made): settling the invoices changes their state too.
OWNERS_NOW = """
SELECT DISTINCT c.account_id FROM stripe_invoice i JOIN subs_customer c USING (stripe_customer_id)
 WHERE i.id IN (SELECT jsonb_array_elements_text(invoice_ids) FROM bad_debt_payment WHERE id = %(id)s)
   AND c.account_id <> %(account)s
 ORDER BY 1
"""
# The other bad-debt payments that settled one of the payment's invoices (it paid them once the payment
# had failed): each such invoice was paid twice. Whatever account made them: the account itself, or
# any the invoices' customer was moved to and away from since (invoice ids are Stripe's, unique).
OTHER_PAYMENTS = """
SELECT id, invoice_ids FROM bad_debt_payment
 WHERE invoice_ids ?| %(invoices)s::text[] AND id <> %(id)s AND state = 'succeeded'
 ORDER BY id
"""
# An overpayment, for an operator: a dead stuck row under a task of its own (re-driven once the
# refund is made, which resolves it), one per payment.
OVERPAID_TASK = "tasks.bad_debt_overpayment_refunded"
# The failure_reason of a payment failed before its settlement found its charge refunded.
REFUND_REASON = """
UPDATE bad_debt_payment SET failure_reason = %(reason)s, updated_at = now() WHERE id = %(id)s AND state = 'failed'
"""


class NotSettled(Exception):
    """Stripe refused to mark an invoice paid and it is not paid or void either."""


@dataclass(frozen=True)
class Settlement:
    payment_id: int
    account_id: str | None
    outcome: str  # settled | already_done | not_charged | refunded | unknown_payment | busy
    invoices: tuple[str, ...] = ()
    enqueue: bool = False
    # Invoices the customer also paid some other way (or that were voided) while this payment ran:
    # paid twice. Each with what Stripe says about it.
    settled_elsewhere: tuple[str, ...] = ()
    details: tuple[str, ...] = ()
    alerted: bool = False  # an overpayment alert was written (a refund that left money owed, too)
    reopened: int | None = None  # a payment charged after all that took the in-flight slot this one freed
    owners_to_enqueue: tuple[str, ...] = ()  # accounts owning the invoices now whose request this created


# How many calls to pay an invoice out of band were sent: each after the first gets a key of its
# own, since Stripe replays a 5xx for a key's 24 hours (paying a paid invoice is refused anyway).
SENDING = """
UPDATE bad_debt_payment
   SET settle_sent = jsonb_set(settle_sent, ARRAY[%(invoice)s], to_jsonb(
           CASE WHEN jsonb_typeof(settle_sent->%(invoice)s) = 'number' THEN (settle_sent->>%(invoice)s)::int
                ELSE 0 END + 1))
 WHERE id = %(id)s
RETURNING (settle_sent->>%(invoice)s)::int - 1
"""
# A call Stripe refused before running it was not sent after all: nothing ran, and Stripe saved no
# answer under its key. With none sent before it, the invoice is not one a call of ours may have
# paid (a refund before settlement names those for an operator).
UNSENT = """
UPDATE bad_debt_payment
   SET settle_sent = CASE WHEN %(sent)s::int = 0 THEN settle_sent - %(invoice)s
                          ELSE jsonb_set(settle_sent, ARRAY[%(invoice)s], to_jsonb(%(sent)s::int)) END
 WHERE id = %(id)s
"""
# Refusals that come before Stripe runs a request: a rate limit, a key it does not accept.
NOT_RUN = (stripe.RateLimitError, *KEY_REFUSED)
# The customer's own money on an invoice: Stripe's invoice payments by payment intent or charge.
# Ours is out of band (no payment object): whoever closed the invoice, these are what was paid twice.
CUSTOMER_PAYMENTS = ("payment_intent", "charge")


def _pay_out_of_band(rt: Runtime, client: stripe.StripeClient, payment_id: int,
                     invoice_id: str) -> tuple[dict[str, Any], bool]:
    """(Stripe's invoice, settled: paid out of band by this call or an earlier one whose answer was
    lost, or found paid or void; whether someone else closed it: refused at this payment's very first
    call, when none of its own can have run)."""
    with unit_of_work(rt.engine) as conn:
        sent_before = int(conn.exec_driver_sql(SENDING, {"invoice": invoice_id, "id": payment_id}).scalar_one())
    key = f"bad-debt-settle-{payment_id}-{invoice_id}" + (f"-{sent_before}" if sent_before else "")
    closed_by_other = False
    try:
        invoice = client.v1.invoices.pay(invoice_id, {"paid_out_of_band": True}, {"idempotency_key": key})
    except stripe.InvalidRequestError as exc:
        # Refused: already paid or voided, or not payable. Nothing was paid by this call: when Stripe
        # cannot show the invoice now (a rate limit, no answer), the task runs again, and this call
        # must not count as sent, or the next would look like a retry of a call that may have paid the
        # invoice, and someone else's close of it (the customer paid twice) no overpayment. The next
        # run asks the same question under this call's key (Stripe replays its refusal).
        try:
            invoice = client.v1.invoices.retrieve(invoice_id)
        except stripe.StripeError:
            _unsend(rt, payment_id, invoice_id, sent_before)
            raise
        if invoice.status not in SETTLED_STATUSES:
            raise NotSettled(f"Stripe refused to pay invoice {invoice_id} out of band "
                             f"(status {invoice.status})") from exc
        closed_by_other = sent_before == 0
    except (stripe.APIError, stripe.APIConnectionError):
        invoice = client.v1.invoices.retrieve(invoice_id)  # it may have run: did it?
        if invoice.status not in SETTLED_STATUSES:
            raise  # the task retries, with a new key
    except NOT_RUN:
        # Counted as sent, this call would make the next one look like a retry of a call that may
        # have paid the invoice, and a refusal then (someone else closed it meanwhile) no overpayment.
        _unsend(rt, payment_id, invoice_id, sent_before)
        raise
    found: dict[str, Any] = invoice.to_dict(for_json=True)
    return found, closed_by_other


def _unsend(rt: Runtime, payment_id: int, invoice_id: str, sent_before: int) -> None:
    """The call just counted (SENDING) paid nothing: it is not counted (UNSENT)."""
    with unit_of_work(rt.engine) as conn:
        conn.exec_driver_sql(UNSENT, {"invoice": invoice_id, "sent": sent_before, "id": payment_id})


def customer_paid(client: stripe.StripeClient, invoice_id: str) -> int:
    """What the customer's own payment intents and charges paid on the invoice, by Stripe's record
    (its invoice payments)."""
    return sum(int(p.get("amount_paid") or 0)
               for p in (x.to_dict() for x in client.v1.invoice_payments.list(
                   {"invoice": invoice_id, "limit": 100}).auto_paging_iter())
               if p.get("status") == "paid" and (p.get("payment") or {}).get("type") in CUSTOMER_PAYMENTS)


def credited_since(invoice: dict[str, Any], quoted: dict[str, Any] | None) -> int:
    """What credit notes issued since the quote took off what the invoice owed (Stripe adds their
    pre-payment part to pre_payment_credit_notes_amount and lowers amount_remaining by it, with no
    invoice payment; paying it out of band changes neither). 0 for a payment quoted before this was
    kept: nothing to compare with."""
    if not quoted:
        return 0
    credited = int(invoice.get("pre_payment_credit_notes_amount") or 0) - int(quoted["pre_payment_credit_notes_amount"])
    return max(min(credited, int(quoted["amount_remaining"])), 0)


def _paid_elsewhere(client: stripe.StripeClient, invoice: dict[str, Any], paid_before: int,
                    quoted: dict[str, Any] | None, closed_by_other: bool) -> str | None:
    """What else settled the invoice while this payment ran, from Stripe's own record of it (not
    from timing: clocks and lost answers make that guesswork): the customer's own payments on it
    beyond those when the balance was quoted, credit notes issued on it since then, a void, or a
    close by someone else (marked paid out of band by support, say). None when nothing did; one
    detail for the invoice otherwise."""
    if invoice.get("status") == "void":
        return f"{invoice['id']} was voided"
    currency = invoice.get("currency")
    extra = customer_paid(client, str(invoice["id"])) - paid_before
    credited = credited_since(invoice, quoted)
    # Read by support (the settlement's details, the overpaid alert): major units, as app/money.py says.
    parts = ([f"{money(extra, currency)} paid by the customer"] if extra > 0 else []) + \
        ([f"{money(credited, currency)} credited by a credit note"] if credited > 0 else [])
    if parts:
        return f"{invoice['id']}: {', '.join(parts)}"
    return f"{invoice['id']} was closed some other way before this payment settled it" if closed_by_other else None


# The invoice's status_transitions field that says when Stripe moved it to each closed status.
STATUS_TRANSITIONS = {"paid": "paid_at", "void": "voided_at", "uncollectible": "marked_uncollectible_at"}


def mirror_rows(event_type: str, source: str, obj: dict[str, Any], created: int | None = None) -> list[Any]:
    """An API object Stripe returned, mapped by the webhook mirror's own code (same columns, same
    ordering guard) as if it came in an event of ``event_type``, stamped ``created`` (epoch
    seconds; by default stripe_time)."""
    from webhooks.mirror import extract

    envelope = {"object": "event", "id": f"{source}_{obj['id']}", "type": event_type,
                "created": stripe_time(obj) if created is None else created, "data": {"object": obj}}
    return list(extract(envelope).rows)


def stripe_time(obj: dict[str, Any]) -> int:
    """When Stripe made ``obj`` what it is, by Stripe's clock: for an invoice closed (paid, void,
    uncollectible), its status transition's time, the ``created`` of the event Stripe sends about
    it. The ordering guard compares a mirror row's time with the events' (Stripe's clock): stamped
    by a host whose clock is ahead, the row would outrank every event of the next minutes about the
    object and have them dropped as older (a payment of an invoice marked uncollectible, say). Else
    this host's clock."""
    if obj.get("object") == "invoice":
        at = (obj.get("status_transitions") or {}).get(STATUS_TRANSITIONS.get(str(obj.get("status")), ""))
        if isinstance(at, int) and not isinstance(at, bool) and at > 0:
            return at
    return int(time.time())


def settle(rt: Runtime, payment_id: int) -> Settlement:
    """Raises stripe errors (the task classifies them) and NotSettled. One settlement per account
    at a time: the webhook's, the beat sweep's and the reconciliation's may overlap for a payment,
    and two payments of one debt may both have been charged (a failed one whose charge turned up);
    each must see what the other settled."""
    with rt.engine.connect() as conn:
        account_id = conn.exec_driver_sql(ACCOUNT, {"id": payment_id}).scalar()
    if account_id is None:
        return Settlement(payment_id, None, "unknown_payment")
    with session_lock(rt.engine, f"bad_debt_settle:{account_id}") as got:
        if not got:
            return Settlement(payment_id, account_id, "busy")
        return _settle(rt, payment_id)


def _settle(rt: Runtime, payment_id: int) -> Settlement:
    from app.payments.bad_debt_webhook import refunded_after_settlement
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
    if row["amount_refunded"]:
        # Refunded before it settled: the money is not (all) in.
        return _refunded(rt, payment_id, account_id, int(row["amount"]), str(row["currency"]),
                         int(row["amount_refunded"]), sorted(row["settle_sent"] or {}))
    client = make_stripe_client(rt.settings)
    settled = [_pay_out_of_band(rt, client, payment_id, str(inv)) for inv in row["invoice_ids"] or []]
    paid = [invoice for invoice, _ in settled]
    before = row["invoices_paid_before"] or {}
    quoted = row["invoices_quoted"] or {}
    invoice_ids = [str(inv) for inv in row["invoice_ids"] or []]
    with rt.engine.connect() as conn:
        others = conn.exec_driver_sql(OTHER_PAYMENTS, {"invoices": invoice_ids, "id": payment_id}).fetchall()
    # Another bad-debt payment closed it: that says who (rather than "someone else"), and all this
    # payment paid for it is owed back. Nothing else about it is said: what else settled it meanwhile
    # (a credit note, a payment of the customer's) the other payment's quote took in, or its own
    # settlement named; said here too, it would be refunded twice. Each invoice is named once, for the
    # first such payment.
    by_payment: dict[str, str] = {}
    for other_id, invoices in others:
        for inv in invoice_ids:
            if inv in (invoices or []):
                by_payment.setdefault(inv, f"{inv}: also paid by bad-debt payment {other_id}")
    also = [(str(invoice["id"]), detail) for invoice, by_other in settled if str(invoice["id"]) not in by_payment
            and (detail := _paid_elsewhere(client, invoice, int(before.get(str(invoice["id"]), 0)),
                                           quoted.get(str(invoice["id"])), by_other))]
    also += list(by_payment.items())
    cause = f"bad_debt_payment:{payment_id}"
    with unit_of_work(rt.engine) as conn:
        # The request rows (the account the customer moved to first, as ingest routes the intent's
        # webhook to it), the mirror rows, then the payment row: the order webhook ingest locks them
        # in (its statement, then record_outcome), so the two cannot deadlock.
        owners_created = request_owners_now(conn, payment_id, account_id, cause)
        created = request_recompute(conn, account_id, Trigger.BAD_DEBT_PAID.value, cause)
        for invoice in paid:
            for mirror_row in mirror_rows("invoice.paid", f"bad_debt_settle_{payment_id}", invoice):
                upsert_row(conn, mirror_row)
        conn.exec_driver_sql(LOCK_PAYMENT, {"id": payment_id})
        refunded = int(conn.exec_driver_sql(REFUNDED_NOW, {"id": payment_id}).scalar() or 0)
        conn.exec_driver_sql(MARK_SUCCEEDED, {"id": payment_id})
        if refunded:
            # Refunded while the invoices were being paid: its webhook found the payment pending and
            # left it to this run, which had read the charge before. The invoices are paid all the same.
            refunded_after_settlement(conn, account_id, payment_id, int(row["amount"]), str(row["currency"]),
                                       [str(i) for i in row["invoice_ids"] or []], {"amount_refunded": refunded})
        details = "; ".join(detail for _, detail in also)
        if also:  # in the same transaction: a worker dying after the commit cannot lose it
            raise_alert(conn, account_id, OVERPAID_TASK, {"payment_id": payment_id},
                        f"overpaid: bad-debt payment {payment_id} ({money(row['amount'], row['currency'])}) "
                        "also covered invoices "
                        f"settled some other way while it ran ({details}); the customer is owed a refund")
    if also:
        log.error("bad-debt payment %s of %s for %s covered invoices settled some other way: %s",
                  payment_id, row["amount"], account_id, details)
    log.info("bad-debt payment %s settled %d invoice(s) for %s", payment_id, len(paid), account_id)
    return Settlement(payment_id, account_id, "settled", tuple(str(i["id"]) for i in paid), enqueue=created,
                      settled_elsewhere=tuple(dict.fromkeys(i for i, _ in also)), details=tuple(d for _, d in also),
                      owners_to_enqueue=owners_created)


def request_owners_now(conn: Connection, payment_id: int, account_id: str, cause: str) -> tuple[str, ...]:
    """Request the recompute of the accounts other than the payer that own the payment's invoices
    now (another team moved their customer): while the payment was in flight their decision held
    the invoices' bad-debt consequences (compute: guard.payment_elsewhere), and its outcome, success
    or failure, ends that hold. -> those whose request this created (the caller enqueues them)."""
    from webhooks.store import request_recompute

    owners = [str(a) for a in conn.exec_driver_sql(OWNERS_NOW, {"id": payment_id, "account": account_id}).scalars()]
    return tuple(a for a in owners if request_recompute(conn, a, Trigger.BAD_DEBT_PAID.value, cause))


def _refunded(rt: Runtime, payment_id: int, account_id: str, amount: int, currency: str, refunded: int,
              sent: list[str]) -> Settlement:
    """The payment fails: the debt stays. Refunded in part, the customer paid the rest for nothing:
    an operator returns it (the overpayment alert). If an earlier run had already asked Stripe to
    pay invoices out of band, they may be closed with no money in: an operator must look too."""
    from app.payments.bad_debt_webhook import REFUND_FAILURE, mark_failed
    from webhooks.store import request_recompute

    kept = max(amount - refunded, 0)
    problems = [f"the customer is owed the other {money(kept, currency)}"] if kept else []
    if sent:
        problems.append(f"invoice(s) {', '.join(sent)} may have been paid out of band already: "
                        "reopen them at Stripe, or the debt is cleared with no money")
    with unit_of_work(rt.engine) as conn:
        owners = request_owners_now(conn, payment_id, account_id, f"bad_debt_payment:{payment_id}")
        created = request_recompute(conn, account_id, Trigger.BAD_DEBT_PAID.value, f"bad_debt_payment:{payment_id}")
        # REOPEN tells it by its prefix only: the amounts are for the person reading it (major units).
        reason = f"{REFUND_FAILURE} ({money(refunded, currency)} of {money(amount, currency)})"
        # Failed already (its charge turned up while another payment held the in-flight slot, and it
        # was settled as it was): MARK_FAILED changes only a pending payment, and REOPEN tells one
        # failed for its refund by this reason. Its earlier reason (never charged, say) was wrong.
        conn.exec_driver_sql(REFUND_REASON, {"reason": reason, "id": payment_id})
        reopened = mark_failed(conn, account_id, payment_id, reason, None)
        # A run again (its message redelivered, the intent's second success webhook) finds the alert
        # open: the same overpayment, not counted again (dunning_bad_debt_overpaid_total).
        alerted = bool(problems) and raise_alert(
            conn, account_id, OVERPAID_TASK, {"payment_id": payment_id},
            f"overpaid: bad-debt payment {payment_id} ({money(amount, currency)}) was refunded "
            f"{money(refunded, currency)} before it "
            f"settled, and failed; {'; '.join(problems)}")
    log.warning("bad-debt payment %s of %s was refunded (%s of %s) before it settled anything", payment_id,
                account_id, refunded, amount)
    return Settlement(payment_id, account_id, "refunded", enqueue=created, alerted=alerted, reopened=reopened,
                      owners_to_enqueue=owners)


def unsettled(rt: Runtime, older_than_seconds: float = 60.0, limit: int = 100) -> list[int]:
    with rt.engine.connect() as conn:
        return [int(r[0]) for r in conn.exec_driver_sql(UNSETTLED, {"age": older_than_seconds, "limit": limit})]
