"""Reconcile a bad-debt payment whose outcome never arrived, by asking Stripe.

A payment stays pending (its account ``lifting``) until the intent's webhook says how it ended.
When that never comes (Stripe answered 5xx or not at all and the intent was never created, the
webhook was lost, the web process died before it saved Stripe's answer, an intent waits for a
customer who is not there), beat asks Stripe about every payment still pending past the guard
window, with a growing interval (5 minutes, doubling, at most an hour):

* the intent, by its id, or else among the customer's intents created since the payment, by the
  ``bad_debt_payment_id`` this product put in its metadata (a listing, which is consistent, not
  the search API, which lags behind writes, by up to an hour in an incident: exactly then);
* ``succeeded``: mirrored as its webhook would be, then settled by the settlement task;
* ``requires_payment_method`` or ``canceled``: failed, with the decline as the reason;
* ``requires_action`` / ``requires_confirmation`` / ``requires_capture``: an off-session intent no
  customer will finish (its client secret was never handed out), cancelled, then failed;
* ``processing``: Stripe has not decided (a bank debit takes days); looked at again later;
* no intent at all, twice in a row, the checks 5 minutes or more apart: the payment was never
  made, and never will be (nothing sends its create again), so it failed.

The create call is never sent again here: Stripe forgets an idempotency key after 24 hours, and a
second create could charge the customer a balance that is no longer owed.

Marking a payment failed takes the recompute request row, then the payment row, like webhook
ingest and POST /pay-bad-debt, and only moves a payment that is still pending: a webhook arriving
at the same moment ends it once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import stripe

from app.db import unit_of_work
from app.domain.triggers import Trigger
from app.money import money
from app.payments.bad_debt_settle import mirror_rows, request_owners_now
from app.payments.bad_debt_webhook import NOTE_INTENT, failure_reason, mark_failed
from app.payments.stripe_client import make_stripe_client
from app.runtime import Runtime

log = logging.getLogger(__name__)

# Stripe listed no intent for the payment at two checks at least this far apart: never created.
NOT_FOUND_CONFIRM = timedelta(minutes=5)
# How far before the payment's row an intent may have been created (clocks differ).
CLOCK_SKEW_SECONDS = 300
UNFINISHABLE = ("requires_action", "requires_confirmation", "requires_capture")
FAILED = ("requires_payment_method", "canceled")

# Due payments, claimed for one check each: the next one is due after 5, 10, 20, 40, 60 minutes.
# Not one whose settlement failed for good (a dead stuck row, its arguments containing the payment's,
# as the settlement sweep tells them: bad_debt_settle.UNSETTLED): its charge succeeded, and the check
# would find it so and send that settlement again, every hour (a poison one killing a worker child
# each time) while the row waits for an operator. Re-driving the row brings the payment back.
CLAIM = """
UPDATE bad_debt_payment
   SET reconcile_after = %(now)s + LEAST(make_interval(mins => 5 * power(2, LEAST(reconcile_checks, 4))::int),
                                         interval '1 hour'),
       reconcile_checks = reconcile_checks + 1
 WHERE id IN (SELECT b.id FROM bad_debt_payment b
               WHERE b.state = 'pending' AND b.created_at < %(since)s
                 AND COALESCE(b.reconcile_after, '-infinity') <= %(now)s
                 AND NOT EXISTS (SELECT 1 FROM subs_stuck_events s
                                  WHERE s.task_name = 'tasks.settle_bad_debt_payment' AND s.state = 'dead'
                                    AND s.task_args @> jsonb_build_object('payment_id', b.id))
               ORDER BY b.created_at LIMIT %(limit)s FOR UPDATE OF b SKIP LOCKED)
RETURNING id
"""
LOAD = """
SELECT b.id, b.account_id, b.state, b.amount, b.currency, b.stripe_payment_intent_id, b.created_at,
       b.not_found_since, b.reconcile_checks,
       COALESCE(b.stripe_customer_id, (SELECT min(i.stripe_customer_id) FROM stripe_invoice i
                                        WHERE i.id IN (SELECT jsonb_array_elements_text(b.invoice_ids))))
           AS customer
  FROM bad_debt_payment b WHERE b.id = %(id)s
"""
NOTE_STATUS = """
UPDATE bad_debt_payment SET stripe_status = %(status)s, not_found_since = NULL,
       stripe_payment_intent_id = COALESCE(stripe_payment_intent_id, %(pi)s)
 WHERE id = %(id)s AND state = 'pending'
"""
NOTE_NOT_FOUND = """
UPDATE bad_debt_payment SET not_found_since = COALESCE(not_found_since, %(now)s), stripe_status = NULL
 WHERE id = %(id)s AND state = 'pending'
RETURNING not_found_since
"""


LOCK = "SELECT state FROM bad_debt_payment WHERE id = %(id)s FOR UPDATE"
# A statement of its own, after the lock: its snapshot sees what the lock waited for.
CHARGED = """
SELECT EXISTS (SELECT 1 FROM bad_debt_payment b JOIN stripe_payment_attempt a ON a.id = b.stripe_payment_intent_id
                WHERE b.id = %(id)s AND a.status = 'succeeded')
"""


class NotReconciled(Exception):
    """Stripe's answer does not fit the payment (an intent id it does not know, another amount):
    an operator must look."""


@dataclass(frozen=True)
class Reconciled:
    payment_id: int
    account_id: str | None
    # already_done | unknown_payment | processing | not_found_once | failed | charged (settle next)
    outcome: str
    enqueue: bool = False  # this created the account's recompute request: the caller enqueues
    owners_to_enqueue: tuple[str, ...] = ()  # accounts owning the invoices now whose request this created
    settle: int | None = None  # a payment to settle now: this one charged, or one reopened by its failure


def due(rt: Runtime, now: datetime, limit: int = 50) -> list[int]:
    """Claim the payments due a check now (each claim moves its next check on)."""
    since = now - timedelta(minutes=rt.policy.guard_window_minutes)
    with unit_of_work(rt.engine) as conn:
        return [int(r[0]) for r in conn.exec_driver_sql(CLAIM, {"now": now, "since": since, "limit": limit})]


def reconcile(rt: Runtime, payment_id: int, now: datetime) -> Reconciled:
    """Ask Stripe how the payment ended and record it. Raises stripe errors and NotReconciled."""
    from webhooks.store import upsert_row

    with rt.engine.connect() as conn:
        row = conn.exec_driver_sql(LOAD, {"id": payment_id}).mappings().first()
    if row is None:
        return Reconciled(payment_id, None, "unknown_payment")
    account_id = str(row["account_id"])
    if row["state"] != "pending":
        return Reconciled(payment_id, account_id, "already_done")
    client = make_stripe_client(rt.settings)
    intent = _find(client, row)
    if intent is None:
        return _not_found(rt, row, now)
    status = str(intent.get("status"))
    if status in UNFINISHABLE:
        intent = _cancel(client, payment_id, int(row["reconcile_checks"]), intent)
        status = str(intent.get("status"))
    if status == "succeeded":
        with unit_of_work(rt.engine) as conn:
            for mirror_row in mirror_rows("payment_intent.succeeded", f"bad_debt_reconcile_{payment_id}", intent):
                upsert_row(conn, mirror_row)
            conn.exec_driver_sql(NOTE_INTENT, {"pi": intent["id"], "id": payment_id})
        log.info("bad-debt payment %s of %s: Stripe says succeeded; settling", payment_id, account_id)
        return Reconciled(payment_id, account_id, "charged", settle=payment_id)
    if status in FAILED:
        reason = (failure_reason(intent) if intent.get("last_payment_error")
                  else f"not charged: the payment intent is {status}")
        return _fail(rt, row, reason, str(intent["id"]))
    with unit_of_work(rt.engine) as conn:
        conn.exec_driver_sql(NOTE_STATUS, {"status": status, "pi": intent["id"], "id": payment_id})
    return Reconciled(payment_id, account_id, "processing")


def _find(client: stripe.StripeClient, row: Any) -> dict[str, Any] | None:
    """The payment's intent as Stripe holds it now, or None when Stripe holds none."""
    payment_id = int(row["id"])
    if row["stripe_payment_intent_id"]:
        try:
            found: dict[str, Any] = client.v1.payment_intents.retrieve(row["stripe_payment_intent_id"]).to_dict()
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                raise NotReconciled(f"Stripe has no payment intent {row['stripe_payment_intent_id']} "
                                    f"(bad-debt payment {payment_id})") from exc
            raise
        return found
    if not row["customer"]:
        raise NotReconciled(f"bad-debt payment {payment_id} has no Stripe customer to look its intent up by")
    since = int(row["created_at"].timestamp()) - CLOCK_SKEW_SECONDS
    listing = client.v1.payment_intents.list({"customer": row["customer"], "created": {"gte": since}, "limit": 100})
    matches = [pi.to_dict() for pi in listing.auto_paging_iter()
               if (pi.to_dict().get("metadata") or {}).get("bad_debt_payment_id") == str(payment_id)]
    if not matches:
        return None
    if len(matches) > 1:
        raise NotReconciled(f"Stripe holds {len(matches)} payment intents for bad-debt payment {payment_id}")
    [intent] = matches
    if intent.get("amount") != row["amount"] or intent.get("currency") != row["currency"]:
        # Stuck work's error, read by an operator: major units (app/money.py shows an intent's amount
        # that is no integer, or a currency it does not know, as it is; money takes a currency as text).
        theirs = intent.get("currency")
        raise NotReconciled(f"payment intent {intent.get('id')} is for "
                            f"{money(intent.get('amount'), theirs if isinstance(theirs, str) else repr(theirs))}, "
                            f"bad-debt payment {payment_id} for {money(row['amount'], row['currency'])}")
    return intent


def _cancel(client: stripe.StripeClient, payment_id: int, check: int, intent: dict[str, Any]) -> dict[str, Any]:
    """Cancel an intent waiting for a customer who is not there; Stripe's answer (or, when the
    intent moved on meanwhile and cannot be cancelled, how it stands now). One key per check:
    Stripe would replay a 5xx for a key all day, and cancelling twice cannot do harm."""
    try:
        cancelled: dict[str, Any] = client.v1.payment_intents.cancel(
            str(intent["id"]), {"cancellation_reason": "abandoned"},
            {"idempotency_key": f"bad-debt-reconcile-cancel-{payment_id}-{check}"}).to_dict()
    except stripe.InvalidRequestError:
        now: dict[str, Any] = client.v1.payment_intents.retrieve(str(intent["id"])).to_dict()
        return now
    return cancelled


def _not_found(rt: Runtime, row: Any, now: datetime) -> Reconciled:
    payment_id, account_id = int(row["id"]), str(row["account_id"])
    with unit_of_work(rt.engine) as conn:
        since = conn.exec_driver_sql(NOTE_NOT_FOUND, {"now": now, "id": payment_id}).scalar()
    if since is None:  # ended meanwhile
        return Reconciled(payment_id, account_id, "already_done")
    if now - since < NOT_FOUND_CONFIRM:
        return Reconciled(payment_id, account_id, "not_found_once")
    return _fail(rt, row, "not charged: Stripe holds no payment intent for this payment", None)


def _fail(rt: Runtime, row: Any, reason: str, intent_id: str | None) -> Reconciled:
    from webhooks.store import request_recompute

    payment_id, account_id = int(row["id"]), str(row["account_id"])
    with unit_of_work(rt.engine) as conn:
        owners = request_owners_now(conn, payment_id, account_id, f"bad_debt_payment:{payment_id}")
        created = request_recompute(conn, account_id, Trigger.BAD_DEBT_PAID.value, f"bad_debt_payment:{payment_id}")
        # Under the payment's lock, which a webhook holds while it stores the intent's outcome:
        # what Stripe said since this check asked counts (its success arriving meanwhile, say).
        state = conn.exec_driver_sql(LOCK, {"id": payment_id}).scalar_one()
        if state != "pending" or conn.exec_driver_sql(CHARGED, {"id": payment_id}).scalar_one():
            # Ended meanwhile, or its success came in (whose webhook queued the settlement).
            return Reconciled(payment_id, account_id, "already_done", enqueue=created, owners_to_enqueue=owners)
        reopened = mark_failed(conn, account_id, payment_id, reason, intent_id)
    log.warning("bad-debt payment %s of %s failed on reconciliation with Stripe: %s", payment_id, account_id, reason)
    return Reconciled(payment_id, account_id, "failed", enqueue=created, settle=reopened, owners_to_enqueue=owners)
