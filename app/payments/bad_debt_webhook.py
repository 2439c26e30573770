"""The bad-debt payment's PaymentIntent webhooks, inside the ingest transaction.

``payment_intent.payment_failed`` marks the payment failed with the decline as its reason (the
recompute that ingest queues returns the account to bad debt, with that reason).
``payment_intent.succeeded`` leaves the payment pending (the account stays ``lifting``) and names it
for settlement: tasks.settle_bad_debt_payment pays the invoices out of band and only then marks
the payment succeeded, in the transaction that mirrors the paid invoices, so the account never
falls back to bad debt between the charge and the settlement.

The payment is found by its PaymentIntent id, or by the metadata this product put on the intent
(a webhook can outrun the API answer that stores the intent id), whatever account ingest routed the
event to: it routes by the intent's customer, which another team may have moved to another account
since the payment was made. The account that made the payment is then recomputed too. An intent
found by its metadata only is the payment's when it is for the payment's amount in its currency
(as the reconciliation with Stripe requires): another's outcome changes nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from app.dispatch import BrokerUnavailable, enqueue_recompute, send
from app.domain.triggers import Trigger
from app.money import money
from app.payments.alerts import raise_alert, refresh_alert

log = logging.getLogger(__name__)

SETTLE_TASK = "tasks.settle_bad_debt_payment"

# By the intent's id or its metadata, not by the account ingest routed the event to (the intent's
# customer's now, which may have moved since the payment). The metadata is read from a webhook: its
# payment id finds a payment only of the account it names, or of the routed one, and only one that
# charges the intent's customer (a customer moves, a payment's customer does not; rows from before
# the column have none).
FIND = """
SELECT id, account_id, stripe_payment_intent_id, amount, currency FROM bad_debt_payment
 WHERE stripe_payment_intent_id = %(pi)s
    OR (id = %(meta_id)s AND account_id IN (%(meta_account)s, %(account)s)
        AND (stripe_customer_id IS NULL OR stripe_customer_id = %(customer)s))
 ORDER BY id LIMIT 1
"""
LOCK = "SELECT state, amount, currency, invoice_ids FROM bad_debt_payment WHERE id = %(id)s FOR UPDATE"
MARK_FAILED = """
UPDATE bad_debt_payment SET state = 'failed', failure_reason = %(reason)s, updated_at = now(),
       stripe_payment_intent_id = COALESCE(stripe_payment_intent_id, %(pi)s)
 WHERE id = %(id)s AND state = 'pending'
"""
# The failure_reason of a payment its settlement failed because its charge was refunded first
# (bad_debt_settle._refunded, which alerted an operator to what the customer is owed).
REFUND_FAILURE = "refunded before settlement"
# Not a payment its settlement failed for its refund (Stripe may deliver the success again, or late):
# that settlement said all there is to say. A payment failed for another reason (the reconciliation
# found no intent) whose charge turned up refunded, in part or whole, is reopened all the same: its
# settlement fails it for the refund and names what the customer is owed (money kept unseen else).
REOPEN = """
UPDATE bad_debt_payment b SET state = 'pending', failure_reason = NULL, updated_at = now()
 WHERE b.id = %(id)s AND b.state = 'failed'
   AND NOT starts_with(COALESCE(b.failure_reason, ''), %(refund_failure)s)
RETURNING b.id
"""
# Once the account's in-flight slot is free again (the payment holding it just failed, in this
# transaction), a failed payment whose charge succeeded after all takes it: the oldest one.
REOPEN_CHARGED = """
UPDATE bad_debt_payment SET state = 'pending', failure_reason = NULL, updated_at = now()
 WHERE id = (SELECT b.id FROM bad_debt_payment b JOIN stripe_payment_attempt a ON a.id = b.stripe_payment_intent_id
              WHERE b.account_id = %(account)s AND b.state = 'failed' AND a.status = 'succeeded'
                AND a.amount_refunded = 0
              ORDER BY b.id LIMIT 1)
   AND NOT EXISTS (SELECT 1 FROM bad_debt_payment WHERE account_id = %(account)s AND state = 'pending')
RETURNING id
"""


def reopen_charged(conn: Connection, account_id: str) -> int | None:
    """The account's in-flight slot is free: a failed payment whose charge succeeded after all takes
    it. Its id, whose settlement the caller queues after commit (else the settlement sweep finds it)."""
    reopened = conn.exec_driver_sql(REOPEN_CHARGED, {"account": account_id}).scalar()
    return None if reopened is None else int(reopened)


def mark_failed(conn: Connection, account_id: str, payment_id: int, reason: str, intent_id: str | None) -> int | None:
    """The payment failed; if another of the account's payments was charged after all while this
    one held the in-flight slot, that one is in flight again: its id, to settle after commit."""
    conn.exec_driver_sql(MARK_FAILED, {"reason": reason, "pi": intent_id, "id": payment_id})
    return reopen_charged(conn, account_id)
NOTE_INTENT = """
UPDATE bad_debt_payment SET stripe_payment_intent_id = COALESCE(stripe_payment_intent_id, %(pi)s), updated_at = now()
 WHERE id = %(id)s
"""


def _intent(event: Mapping[str, Any]) -> Mapping[str, Any]:
    data = event.get("data")
    obj = data.get("object") if isinstance(data, Mapping) else None
    return obj if isinstance(obj, Mapping) else {}


def _metadata(intent: Mapping[str, Any], name: str) -> str | None:
    metadata = intent.get("metadata")
    value = metadata.get(name) if isinstance(metadata, Mapping) else None
    return value if isinstance(value, str) else None


def _customer(intent: Mapping[str, Any]) -> str | None:
    customer = intent.get("customer")
    return customer if isinstance(customer, str) else None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def _same_money(intent: Mapping[str, Any], amount: int, currency: str) -> bool:
    """Whether the intent is for the payment's amount in its currency (Stripe writes codes in lower
    case, as the mirror keeps the invoices' currency the payment took)."""
    theirs = intent.get("currency")
    return (intent.get("amount") == amount and not isinstance(intent.get("amount"), bool)
            and isinstance(theirs, str) and theirs.strip().lower() == str(currency).strip().lower())


def _meta_id(intent: Mapping[str, Any]) -> int:
    raw = _metadata(intent, "bad_debt_payment_id")
    # Our own metadata, but read from a webhook: ASCII digits that fit a bigint, or no payment.
    return int(raw) if raw is not None and raw.isascii() and raw.isdigit() and len(raw) <= 18 else -1


def failure_reason(intent: Mapping[str, Any]) -> str:
    if intent.get("status") == "canceled":
        reason = intent.get("cancellation_reason")
        return f"canceled: {reason}" if isinstance(reason, str) and reason else "canceled"
    error = intent.get("last_payment_error")
    if not isinstance(error, Mapping):
        return "declined"
    code = error.get("decline_code") or error.get("code") or error.get("type") or "unknown"
    return f"declined: {code}"


# A cancelled intent (an operator at Stripe, or Stripe itself) ends the payment with no money, as
# a decline does: the account goes back to bad debt now, not at the reconciliation past the guard.
FAILED_OUTCOMES = ("payment_intent.payment_failed", "payment_intent.canceled")
INTENT_OUTCOMES = ("payment_intent.succeeded", *FAILED_OUTCOMES)
REFUNDED = "charge.refunded"
# The alert of a payment refunded after it settled; its task only acknowledges (tasks/bad_debt.py).
REFUNDED_AFTER_SETTLEMENT_TASK = "tasks.bad_debt_refund_after_settlement_reviewed"
# A chargeback of the payment's charge: the bank may take the money back while the invoices it paid
# out of band stay paid. Its alert's task only acknowledges, too.
DISPUTED = "charge.dispute.created"
DISPUTED_TASK = "tasks.bad_debt_dispute_reviewed"


def concerns(event_type: str, payment_intent: str | None) -> bool:
    """Whether the event may be about a bad-debt payment's outcome (record_outcome must see it)."""
    return event_type in (*INTENT_OUTCOMES, REFUNDED, DISPUTED) and bool(payment_intent)


@dataclass(frozen=True)
class Recorded:
    """What ingest does after its commit."""

    settle: int | None = None  # a payment whose charge succeeded: to settle
    # The account that made the payment, when the event was routed to another one (its customer
    # moved) and this created its recompute request: to enqueue.
    recompute: str | None = None
    cause: str | None = None


def record_outcome(conn: Connection, event_type: str, account_id: str, payment_intent: str | None,
                   event: Mapping[str, Any]) -> Recorded | None:
    """Mark a failure now; name a payment whose charge succeeded (to settle after commit): this one,
    or on a failure one that was charged after all and takes the freed in-flight slot. ``account_id``
    is the account ingest routed the event to (and requested the recompute of)."""
    from webhooks.store import request_recompute

    if not concerns(event_type, payment_intent):
        return None
    intent = _intent(event)
    found = conn.exec_driver_sql(FIND, {"account": account_id, "pi": payment_intent, "meta_id": _meta_id(intent),
                                        "meta_account": _metadata(intent, "account_id"),
                                        "customer": _customer(intent)}).first()
    if found is None:
        return None
    payment_id, owner = int(found[0]), str(found[1])
    if event_type in INTENT_OUTCOMES and found[2] != payment_intent and not _same_money(intent, found[3], found[4]):
        # Found by its metadata only (the create's answer, holding the intent id, never came), for
        # another amount or currency than the payment's: not its charge (the same integer in yen is
        # no dollar debt paid). Its outcome neither pays the debt's invoices nor ends the payment in
        # flight; the reconciliation with Stripe refuses such an intent for an operator.
        log.warning("payment intent %s names bad-debt payment %s but is for %s, the payment for %s: not its outcome",
                    payment_intent, payment_id, money(intent.get("amount"), _text(intent.get("currency"))),
                    money(found[3], found[4]))
        return None
    cause = f"bad_debt_payment:{payment_id}"
    # The payer's request row before the payment row, the order every writer of the payment takes.
    requested = owner != account_id and request_recompute(conn, owner, Trigger.BAD_DEBT_PAID.value, cause)
    state, amount, currency, invoices = conn.exec_driver_sql(LOCK, {"id": payment_id}).one()
    settle = _apply_outcome(conn, event_type, owner, payment_id, str(state), int(amount), str(currency),
                            invoices or [], payment_intent, intent)
    return Recorded(settle, owner if requested else None, cause)


def _apply_outcome(conn: Connection, event_type: str, account_id: str, payment_id: int, state: str, amount: int,
                   currency: str, invoices: list[str], payment_intent: str | None,
                   intent: Mapping[str, Any]) -> int | None:
    """Record the event on the payment (locked) of ``account_id``; a payment to settle, or None."""
    if event_type == DISPUTED:
        disputed(conn, account_id, payment_id, amount, currency, state, invoices, intent)
        return None
    if event_type == REFUNDED:
        # Settled already: an operator must look. Before or while it settles, the settlement sees the
        # refund (bad_debt_settle: it reads the charge first, and again under this row's lock at the end).
        if state == "succeeded":
            refunded_after_settlement(conn, account_id, payment_id, amount, currency, invoices, intent)
        return None
    if event_type in FAILED_OUTCOMES:
        return mark_failed(conn, account_id, payment_id, failure_reason(intent), payment_intent)
    conn.exec_driver_sql(NOTE_INTENT, {"pi": payment_intent, "id": payment_id})
    if state == "failed":
        # Marked failed, and its charge succeeded after all (the reconciliation found no intent, and
        # it turned up): the customer's money pays the debt. In flight again until it is settled, so
        # the account is lifting and no second payment can charge the same debt; unless another
        # payment is in flight already (its settlement will find the debt paid: an overpayment).
        try:
            with conn.begin_nested():
                reopened = conn.exec_driver_sql(REOPEN, {"id": payment_id, "refund_failure": REFUND_FAILURE}).scalar()
        except IntegrityError:  # the in-flight slot is taken: settled all the same, as said above
            return payment_id
        return None if reopened is None else payment_id  # None: its settlement failed it for its refund
    return payment_id if state == "pending" else None


def refunded_after_settlement(conn: Connection, account_id: str, payment_id: int, amount: int, currency: str,
                               invoices: list[str], charge: Mapping[str, Any]) -> None:
    """The invoices were paid out of band with money that went back: the debt is cleared with
    nothing in. Stripe cannot reopen a paid invoice, so an operator decides (bill again, or let it
    go); the payment stays succeeded, as it happened. One alert per payment, naming the most refunded
    so far: a further refund while it is open says so on it (an operator billing again only the first
    part would let the rest go with nothing in), and a late delivery of an earlier one says no less."""
    refunded = _refunded_so_far(conn, charge)
    error = (f"refunded after settlement: bad-debt payment {payment_id} ({money(amount, currency)}) was "
             f"refunded ({money(refunded, currency)}) after it paid invoice(s) {', '.join(invoices)} out of "
             "band; the debt is cleared with no money in: bill it again, or confirm it is written off")
    args = {"payment_id": payment_id}
    if raise_alert(conn, account_id, REFUNDED_AFTER_SETTLEMENT_TASK, args, error):
        log.error("bad-debt payment %s of %s refunded after settlement", payment_id, account_id)
    elif refresh_alert(conn, REFUNDED_AFTER_SETTLEMENT_TASK, args, error):
        log.error("bad-debt payment %s of %s refunded further after settlement", payment_id, account_id)


# What the mirror's attempt row of the charge's payment intent holds refunded: the greatest amount
# any of its events said (webhooks/mirror.py ATTEMPT_MERGE), this event's written just before in the
# same transaction.
REFUNDED_SO_FAR = "SELECT amount_refunded FROM stripe_payment_attempt WHERE id = %(pi)s"


def _refunded_so_far(conn: Connection, charge: Mapping[str, Any]) -> Any:
    """The charge's amount refunded: the event's, or more where an earlier-delivered event said more."""
    said = charge.get("amount_refunded")
    intent = charge.get("payment_intent")
    kept = conn.exec_driver_sql(REFUNDED_SO_FAR, {"pi": intent}).scalar() if isinstance(intent, str) else None
    if isinstance(kept, int) and (isinstance(said, bool) or not isinstance(said, int) or kept > said):
        return kept
    return said


def disputed(conn: Connection, account_id: str, payment_id: int, amount: int, currency: str, state: str,
             invoices: list[str], dispute: Mapping[str, Any]) -> None:
    """The payment's charge is disputed: the customer's bank may take the money back (a lost
    dispute), and the invoices the payment pays out of band stay paid with nothing in, as after a
    refund. An operator answers the dispute at Stripe and, if it is lost, bills the debt again or
    writes it off; then re-drives the row. Whatever the payment's state: settlement goes on (a
    dispute may be won), and what it does is said."""
    done = "paid" if state == "succeeded" else "pays (once settled)"
    # The amount the bank may take back, in the dispute's own currency (the charge's, as a rule).
    theirs = dispute.get("currency")
    at_stake = money(dispute.get("amount"), theirs if isinstance(theirs, str) else currency)
    if raise_alert(conn, account_id, DISPUTED_TASK, {"payment_id": payment_id},
                   f"disputed: the charge of bad-debt payment {payment_id} ({money(amount, currency)}, {state}) "
                   f"is disputed ({at_stake}, reason {dispute.get('reason')}); it {done} invoice(s) "
                   f"{', '.join(invoices)} out of band: if the dispute is lost the debt is cleared with no money "
                   "in: answer it at Stripe, and bill the debt again or confirm it is written off"):
        log.error("bad-debt payment %s of %s disputed", payment_id, account_id)


def after_commit(celery_app: Any, recorded: Recorded) -> None:
    """Ingest's sends once the event and its outcome are committed. If the broker is down, beat
    finds both (the settlement sweep, the stale recompute requests)."""
    if recorded.settle is not None:
        enqueue_settlement(celery_app, recorded.settle)
    if recorded.recompute is not None:
        with contextlib.suppress(BrokerUnavailable):
            enqueue_recompute(celery_app, recorded.recompute, Trigger.BAD_DEBT_PAID.value, recorded.cause)


def enqueue_settlement(celery_app: Any, payment_id: int) -> None:
    """After the ingest commit. If the broker is down, beat's settlement sweep finds the payment."""
    with contextlib.suppress(BrokerUnavailable):
        send(celery_app, SETTLE_TASK, [payment_id], ignore_result=True)
