"""Charging one dispatched retry: at most once, only while it is still due.

* Two workers holding the same retry (a duplicate message, a redelivery while the first still runs):
  a per-retry advisory lock on a connection of its own lets one of them charge; the other does
  nothing. If the holder dies, PostgreSQL drops its connection and with it the lock.
* The row moves dispatched -> charging (committed) -> sent | failed | refused | skipped. A row found in
  ``charging`` by a later delivery means its worker died mid-charge: it is charged again with the
  *same* idempotency key, so Stripe replays the first answer instead of charging twice. A try Stripe
  rate limits (429: it never ran) puts the row back in the state it was claimed in: a row claimed
  from ``charging`` stays there, since the earlier try may have charged.
* The outcome of a charge arrives by webhook and recompute takes it from there. A card decline is
  an outcome, not a task failure: the row is marked failed and the account recomputed. A request
  Stripe refused unsent is marked refused with a recompute request (compute then waits the refused
  backoff under a new key), and the task fails for an operator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import stripe
from sqlalchemy import Connection, Engine

from app.db import session_lock, unit_of_work
from app.domain.compute import compute
from app.domain.policy import Policy
from app.domain.snapshot import card_expired, not_before
from app.domain.triggers import Trigger
from app.money import money
from app.payments.bad_debt_settle import SETTLED_STATUSES, mirror_rows
from app.payments.retries import DueRetry, idempotency_key
from app.payments.stripe_client import KEY_REFUSED
from app.recompute.gather import gather
from tasks.failures import FailureKind, TaskFailure, retry_after_seconds
from webhooks.store import request_recompute, upsert_row

log = logging.getLogger(__name__)


ROW_SQL = """
SELECT r.account_id, r.invoice_id, r.payment_method_id, r.idempotency_key, r.state, r.created_at, r.free,
       i.status, i.amount_remaining, d.status, d.next_retry_at, d.retry_invoice_id, d.reasons, d.failure_class,
       -- Whether the mirror holds an attempt on the invoice later than the latest it held at the claim.
       -- Stripe's times against Stripe's (see CLAIM_SQL): never against the claim's own time, which
       -- is beat's clock, not Stripe's. An attempt linked to no invoice (charge.failed and
       -- payment_intent.payment_failed name none since API 2025-03-31: the invoice's own intent declined
       -- on the hosted page or by Stripe's retry) of the invoice's customer counts as the invoice's.
       EXISTS (SELECT 1 FROM stripe_payment_attempt a
                WHERE (a.invoice_id = r.invoice_id
                       OR (a.invoice_id IS NULL AND a.stripe_customer_id = i.stripe_customer_id))
                  AND (r.attempts_seen_until IS NULL OR a.attempted_at > r.attempts_seen_until)),
       -- The customer's default card as the mirror has it now, unless the mirror knows it removed or
       -- expired (compute plans on another card then: retry_cadence); and whether it changed since the
       -- claim: a change later than the latest the mirror held at the claim, both by Stripe's clock.
       CASE WHEN NOT EXISTS (SELECT 1 FROM stripe_payment_method m
                              WHERE m.id = s.default_payment_method_id
                                AND (NOT m.attached OR (m.exp_year, m.exp_month) < (%(year)s, %(month)s)))
            THEN s.default_payment_method_id END,
       coalesce(s.changed_at > coalesce(r.default_change_seen_at, '-infinity'), false),
       -- The claimed card as the mirror knows it: detached (Stripe refuses to charge it).
       EXISTS (SELECT 1 FROM stripe_payment_method m WHERE m.id = r.payment_method_id AND NOT m.attached),
       -- The account that owns the invoice now: another team may have moved its customer since the claim.
       (SELECT c.account_id FROM subs_customer c WHERE c.stripe_customer_id = i.stripe_customer_id),
       -- The policy version the stored decision was made under.
       d.policy_version,
       -- The expiry the mirror has for the card the charge goes to: the claimed one, else the customer's
       -- default (Stripe charges that one). Checked at the claim and again at the charge's own time.
       cm.exp_year, cm.exp_month,
       r.scheduled_for, i.currency
  FROM payment_retry r
  LEFT JOIN stripe_invoice i ON i.id = r.invoice_id
  LEFT JOIN subs_dunning d ON d.account_id = r.account_id
  LEFT JOIN stripe_customer_state s ON s.stripe_customer_id = i.stripe_customer_id
  LEFT JOIN stripe_payment_method cm ON cm.id = coalesce(r.payment_method_id, s.default_payment_method_id)
 WHERE r.id = %(id)s
 FOR UPDATE OF r
"""

# The times other hosts stored judgements about the retry at: the account's decision that planned it
# (subs_dunning.changed_at) and the dispatch that claimed it due (payment_retry.created_at). The claim
# judges at a moment no older than either (claim_moment); read first, since ROW_SQL's card expiry
# is judged at that moment too.
CLAIM_TIMES_SQL = """
SELECT r.created_at, d.changed_at
  FROM payment_retry r LEFT JOIN subs_dunning d ON d.account_id = r.account_id
 WHERE r.id = %(id)s
"""

SET_STATE_SQL = "UPDATE payment_retry SET state = %(state)s, error = %(error)s, updated_at = now() WHERE id = %(id)s"

# The account's two ways to collect money, an automatic retry and the isolated bad-debt payment,
# check each other under this lock (held to the end of the checking transaction), so that one of
# them always sees the other: both at once could collect an invoice twice.
PAYMENT_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtextextended('payment:' || %(account)s, 0))"
# The same for the Stripe customer whose invoices they collect: another team may move it to another
# account at any moment, and a payment or retry of the account it left and one of the account it
# joined, each under its own account's lock, would not see each other. Taken after the account's
# lock, by the two paths that start a charge (_claim, and the bad-debt payment's insert), each once:
# always in that order, so they cannot deadlock. Whatever ends or settles a payment (webhooks,
# settlement, reconciliation) takes neither lock.
CUSTOMER_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtextextended('payment-customer:' || %(customer)s, 0))"
INVOICE_CUSTOMER_SQL = "SELECT stripe_customer_id FROM stripe_invoice WHERE id = %(invoice)s"
# The account's own bad-debt payment in flight (its balance counts the invoice), or any account's
# that covers the invoice: one the old account made before the customer moved collects it too.
BAD_DEBT_PENDING_SQL = """
SELECT EXISTS (SELECT 1 FROM bad_debt_payment WHERE account_id = %(account)s AND state = 'pending')
    OR EXISTS (SELECT 1 FROM bad_debt_payment
                WHERE state = 'pending' AND invoice_ids @> jsonb_build_array(%(invoice)s::text))
"""
# The account's retries, those of the invoices it owns now whichever account claimed them (a
# customer moved by another team takes its invoices, and their retries in flight, with it), and
# those of the invoices the caller is about to collect (quoted before the customer moved away, they
# may be another account's now).
RETRY_CHARGING_SQL = """
SELECT EXISTS (SELECT 1 FROM payment_retry WHERE account_id = %(account)s AND state IN ('charging', 'sent')
                  AND created_at > %(since)s)
    OR EXISTS (SELECT 1 FROM subs_customer c JOIN stripe_invoice i USING (stripe_customer_id)
                 JOIN payment_retry r ON r.invoice_id = i.id
                WHERE c.account_id = %(account)s AND r.state IN ('charging', 'sent') AND r.created_at > %(since)s)
    OR EXISTS (SELECT 1 FROM payment_retry WHERE invoice_id = ANY(%(invoices)s) AND state IN ('charging', 'sent')
                  AND created_at > %(since)s)
"""


def lock_account_payments(conn: Connection, account_id: str) -> None:
    conn.exec_driver_sql(PAYMENT_LOCK_SQL, {"account": account_id})


def lock_customer_payments(conn: Connection, customer_id: str) -> None:
    """Call after lock_account_payments, in the same transaction (CUSTOMER_LOCK_SQL)."""
    conn.exec_driver_sql(CUSTOMER_LOCK_SQL, {"customer": customer_id})


def retry_charging(conn: Connection, account_id: str, now: datetime, guard: timedelta,
                   invoices: Sequence[str] = ()) -> bool:
    """An automatic retry of the account, or of one of ``invoices``, is being charged, or was sent and
    its outcome is not in (within the guard window); call under lock_account_payments and
    lock_customer_payments."""
    return bool(conn.exec_driver_sql(RETRY_CHARGING_SQL, {"account": account_id, "since": now - guard,
                                                          "invoices": list(invoices)}).scalar())

# An invoice a retry found closed at Stripe, mirrored as the webhook of its status would mirror it.
MIRRORED_AS = {"paid": "invoice.paid", "void": "invoice.voided", "uncollectible": "invoice.marked_uncollectible"}

# Stripe's answer when the issuer wants the cardholder to authenticate (3-D Secure) an invoice's
# payment: a 400 invalid_request_error, not a card error, although the attempt was made (the
# invoice's PaymentIntent now waits in requires_action, and its webhooks follow). Read as a refusal it
# would alert an operator and wait the refused backoff for what is the customer's to do.
AWAITING_AUTHENTICATION = frozenset({"invoice_payment_intent_requires_action"})

DUE_SLACK = timedelta(minutes=2)  # beat may run the dispatch a little before a worker picks it up
# Stripe keeps an idempotency key's answer for at least 24 hours, then may prune it: a request sent
# again after that runs afresh instead of replaying. A retry is never sent again past it, whatever
# the guard window (the policy allows up to a week).
STRIPE_KEY_LIFETIME = timedelta(hours=24)


@dataclass(frozen=True)
class PayResult:
    retry_id: int
    outcome: str  # busy | done | skipped | sent | indeterminate | failed | refused | missing
    account_id: str | None = None
    failure_class: str | None = None
    detail: str | None = None
    # A recompute request row was committed with the outcome (refused): beat re-drives it if its
    # message is lost, and the message is a coalesced one.
    requested: bool = False
    # Refused for our API key (401/403: rolled, revoked, lacking a permission), not for the request.
    credentials_refused: bool = False

    @property
    def recompute(self) -> bool:
        """Skipped, declined or refused: the decision has to be taken again (after a refusal, compute
        waits the refused backoff under a new key). Sent (or indeterminate): the stored decision
        still says "due" until a recompute sees the retry in flight and clears next_retry_at;
        without it the dispatcher would keep selecting the row every tick, and a pile of such rows
        at the head of its due query could hold back later retries."""
        return self.outcome in ("skipped", "failed", "refused", "sent", "indeterminate")


@dataclass(frozen=True)
class Claimed:
    account_id: str
    invoice_id: str
    payment_method_id: str | None
    idempotency_key: str
    failure_class: str | None
    # dispatched, or charging: an earlier try got no answer and may have charged.
    prior_state: str
    # The expiry the mirror has for the card charged (the claimed one, else the customer's default):
    # checked again at the charge's own time, which may be past midnight UTC of its last valid day.
    card_exp_year: int | None = None
    card_exp_month: int | None = None

    def card_expired_at(self, at: datetime) -> bool:
        return card_expired(self.card_exp_year, self.card_exp_month, at)


def not_due_reason(row: Any, now: datetime, guard: timedelta, policy_version: str | None = None,
                   plans_it: Callable[[], bool] | None = None) -> str | None:
    """Why a dispatched retry must not be charged any more, or None when it still should be.
    ``policy_version``: the version of the policy file in force (None: not checked); ``plans_it``:
    whether that policy plans this very attempt now (asked only of a decision made under another)."""
    (account, invoice, method, _, state, created_at, free, inv_status, remaining, d_status, next_retry_at,
     retry_invoice, reasons, _, newer_attempt, default_method, default_changed_since, method_detached, owner,
     decided_under, card_exp_year, card_exp_month, _, currency) = row
    if inv_status is None:
        return "invoice unknown to the mirror"
    if inv_status != "open" or (remaining or 0) <= 0:
        # The retry row's error, read by support: major units (app/money.py).
        return f"invoice is {inv_status} with {money(remaining, currency)} remaining"
    if owner != account:
        # Its customer moved: the claiming account's decision predates it, and its lock and bad-debt
        # payment are not the owner's. The owner's dispatch re-arms the attempt if it plans it.
        return (f"the invoice belongs to another account now ({owner or 'none'}); its owner's decision plans "
                "its retries")
    if newer_attempt:
        # The mirror heard of an attempt since the claim (the customer on the hosted page, Stripe's own
        # retry): charging now would come right after it. Compute plans afresh, knowing it.
        return "a newer payment attempt was made on the invoice"
    if d_status in (None, "current", "lifting"):
        return f"account status is {d_status}"
    if method_detached:
        # The customer removed the card since the claim (its webhook is in, the recompute that
        # replans not yet): Stripe would refuse it, filed as dead work for an operator.
        return "the claimed payment method is detached; compute plans afresh"
    if card_expired(card_exp_year, card_exp_month, now):
        # Valid when compute planned it (on its day) and maybe when it was claimed, expired by now
        # (Stripe declines it: expired_card, a charge spent for nothing). Compute plans no retry on it.
        return _expired_reason(card_exp_year, card_exp_month)
    if method is not None and default_method is not None and default_method != method \
            and (not free or default_changed_since):
        # Another card is the customer's default now: the card it replaced is not charged, whenever
        # the change was made (before the claim too, when its webhook came after it). Compute plans
        # a scheduled retry on the default, and gives a new card its immediate free retry. A free
        # retry is on a new card that need not be the default: only a change since its claim stops it.
        return "the customer's default payment method is another one than the claimed; compute plans afresh"
    if now - created_at > min(guard, STRIPE_KEY_LIFETIME):
        return "dispatched longer ago than the guard window (or than Stripe keeps its key); compute plans afresh"
    if state == "dispatched" and policy_version is not None and decided_under is not None \
            and decided_under != policy_version and not (plans_it is not None and plans_it()):
        # The policy file changed since the decision (a shorter schedule, a lower cap, no free retry):
        # a retry planned under the old one is not charged unless the one in force plans that very
        # attempt (same invoice, due time, card and kind: what a recompute would re-arm under the same
        # key). Otherwise skipped unsent and the account recomputed under the policy in force. During a
        # rolling deploy two files run at once and neither worker knows which is newer: each charges
        # the other's retry when both plan it alike, and only an attempt they disagree on waits for the
        # decision of a worker that plans it. (A row left charging may have reached Stripe: it is sent
        # again with its key.)
        return (f"the stored decision was made under policy {decided_under}, not {policy_version} in force, "
                "which plans another retry; compute plans afresh")
    planned_here = retry_invoice == invoice and next_retry_at is not None and next_retry_at <= now + DUE_SLACK
    # Once dispatched, compute sees the retry as in flight and clears next_retry_at for it.
    in_flight_here = any(r.get("rule") == "retry.in_flight" and (r.get("facts") or {}).get("invoice") == invoice
                         for r in (reasons or []))
    if not (planned_here or in_flight_here):
        return "the stored decision no longer plans this retry"
    return None


def _expired_reason(exp_year: int | None, exp_month: int | None) -> str:
    return (f"the card charged is expired (valid through {exp_month:02d}/{exp_year}, UTC); "
            "compute plans afresh") if exp_year is not None and exp_month is not None else "the card charged is expired"


def retry_lock(engine: Engine, retry_id: int) -> AbstractContextManager[bool]:
    return session_lock(engine, f"payment_retry:{retry_id}")


def _set_state(engine: Engine, retry_id: int, state: str, error: str | None = None) -> None:
    with unit_of_work(engine) as conn:
        conn.exec_driver_sql(SET_STATE_SQL, {"id": retry_id, "state": state, "error": error})


def _refuse(engine: Engine, retry_id: int, account_id: str, detail: str) -> None:
    """The row becomes refused and the account's recompute is requested in the same transaction:
    no webhook follows a refusal, and until a recompute applies the refused backoff the stored
    decision keeps saying "due" under this attempt's key, which dispatch never claims again."""
    with unit_of_work(engine) as conn:
        # The request row before the retry row: the order webhook ingest and settlements lock in.
        request_recompute(conn, account_id, Trigger.STATE_REFRESH.value, f"retry:{retry_id}:refused")
        conn.exec_driver_sql(SET_STATE_SQL, {"id": retry_id, "state": "refused", "error": detail})


def claim_moment(conn: Connection, retry_id: int, now: datetime) -> datetime:
    """The moment a claim judges the retry at: ``now`` (the worker's clock), but never before the
    account's stored decision that planned it, nor before the dispatch that claimed it due, each
    within MAX_CLOCK_LEAD (decision_moment's rule). Hosts' clocks differ: a worker behind either
    would find the retry not due yet, skip it unsent and have the account recomputed, and the next
    dispatch re-arm the same attempt, until its clock caught up."""
    times = conn.exec_driver_sql(CLAIM_TIMES_SQL, {"id": retry_id}).first()
    if times is None:
        return now
    return max(not_before(times[0], now), not_before(times[1], now))


def plans_same_attempt(conn: Connection, row: Any, policy: Policy, now: datetime) -> bool:
    """Whether ``policy`` plans, now, the very attempt the dispatched retry of ``row`` (ROW_SQL) makes:
    the account's decision computed under it, read-only, from the account's snapshot without this
    retry (which compute would otherwise see in flight), names its invoice, card and kind, and is due
    at its time (the time names the attempt: idempotency_key). ``now``: the claim's moment
    (claim_moment), no older than the stored decision this is asked instead of."""
    account, invoice, method, free, scheduled_for = row[0], row[1], row[2], bool(row[6]), row[22]
    gathered = gather(conn, account)
    if gathered is None:
        return False
    snapshot = gathered[0]
    others = tuple(r for r in snapshot.retries
                   if not (r.invoice_id == invoice and r.scheduled_for == scheduled_for and r.free == free
                           and r.state == "dispatched" and r.created_at == row[5]))
    planned = compute(replace(snapshot, retries=others), policy, now).state
    if planned.retry_invoice_id != invoice or planned.next_retry_at is None or planned.next_retry_at > now + DUE_SLACK:
        return False
    return (planned.retry_free == free and planned.retry_payment_method_id == method
            and idempotency_key(DueRetry(account, invoice, method, free, planned.next_retry_at))
            == idempotency_key(DueRetry(account, invoice, method, free, scheduled_for)))


def _claim(conn: Connection, retry_id: int, now: datetime, guard: timedelta,
           policy_version: str | None = None, policy: Policy | None = None) -> Claimed | PayResult:
    # Every check below judges at this moment, not the worker's clock alone (claim_moment).
    now = claim_moment(conn, retry_id, now)
    utc = now.astimezone(UTC)  # a card is valid through the last day of its expiry month, in UTC
    row = conn.exec_driver_sql(ROW_SQL, {"id": retry_id, "year": utc.year, "month": utc.month}).first()
    if row is None:
        return PayResult(retry_id, "missing")
    account, invoice, method, key, state = row[0], row[1], row[2], row[3], row[4]
    if state not in ("dispatched", "charging"):
        return PayResult(retry_id, "done", account, detail=state)
    plans_it = (lambda: plans_same_attempt(conn, row, policy, now)) if policy is not None else None
    reason = not_due_reason(row, now, guard, policy_version, plans_it)
    if reason is None:
        lock_account_payments(conn, account)
        # Known to the mirror, or not_due_reason would have said so.
        lock_customer_payments(conn, conn.exec_driver_sql(INVOICE_CUSTOMER_SQL, {"invoice": invoice}).scalar_one())
        if conn.exec_driver_sql(BAD_DEBT_PENDING_SQL, {"account": account, "invoice": invoice}).scalar():
            reason = "a bad-debt payment for the account, or one covering the invoice, is in flight"
    if reason is not None:
        # A row left in charging may have reached Stripe before its worker died: it stays counted.
        new_state = "skipped" if state == "dispatched" else "sent"
        conn.exec_driver_sql(SET_STATE_SQL, {"id": retry_id, "state": new_state, "error": "not due: " + reason})
        # Recomputed next: the invoice's owner, whose decision counts this retry (it waits for it while
        # in flight), the claiming account unless the customer moved since.
        return PayResult(retry_id, "skipped", row[18] or account, row[13], detail=reason)
    conn.exec_driver_sql(SET_STATE_SQL, {"id": retry_id, "state": "charging", "error": None})
    return Claimed(account, invoice, method, key, row[13], state, row[20], row[21])


def _utc_now() -> datetime:
    return datetime.now(UTC)


def retry_payment(engine: Engine, client: stripe.StripeClient, retry_id: int, now: datetime,
                  guard_minutes: int = 30, policy_version: str | None = None,
                  clock: Callable[[], datetime] = _utc_now, policy: Policy | None = None) -> PayResult:
    """``policy_version``: the policy file in force (``policy``'s when given); a retry planned under
    another is not charged, unless ``policy`` plans that very attempt (plans_same_attempt).
    ``now``: when the task started (the claim's checks, at no older a moment than the stored decision
    or the dispatch: claim_moment); ``clock`` gives the charge's own time."""
    if policy is not None and policy_version is None:
        policy_version = policy.version
    with retry_lock(engine, retry_id) as got:
        if not got:
            return PayResult(retry_id, "busy", detail="another worker is charging this retry")
        with unit_of_work(engine) as conn:
            claimed = _claim(conn, retry_id, now, timedelta(minutes=guard_minutes), policy_version, policy)
        if isinstance(claimed, PayResult):
            return claimed
        return _charge(engine, client, retry_id, claimed, clock)


def _charge(engine: Engine, client: stripe.StripeClient, retry_id: int, c: Claimed,
            clock: Callable[[], datetime] = _utc_now) -> PayResult:
    if c.prior_state == "dispatched":
        # Stripe pays an invoice marked uncollectible when asked (it refuses only a paid or void one):
        # marked at Stripe before its webhook came, the retry would collect a written-off debt through
        # the regular path. Asked first, not on a row left charging: an earlier try may have paid it.
        try:
            closed = _uncollectible_at_stripe(client, c.invoice_id)
        except NOT_SHOWN_NOW as exc:
            # Not sent: the row goes back to dispatched and the task asks again with its backoff.
            raise _not_shown(engine, retry_id, c, exc, "before the charge") from exc
        if closed is not None:
            detail = f"not due: invoice {closed['status']} at Stripe when charged"
            _skip_closed(engine, retry_id, c.account_id, closed, detail)
            return PayResult(retry_id, "skipped", c.account_id, c.failure_class, detail, requested=True)
    if c.card_expired_at(clock()):
        # The card expired since the claim (midnight UTC of its last valid day passed while the
        # invoice was read at Stripe): not charged, as at the claim, by the charge's own clock. A row
        # claimed from charging may have reached Stripe: it stays counted (sent), as not_due_reason's.
        reason = _expired_reason(c.card_exp_year, c.card_exp_month)
        _set_state(engine, retry_id, "skipped" if c.prior_state == "dispatched" else "sent", "not due: " + reason)
        return PayResult(retry_id, "skipped", c.account_id, c.failure_class, detail=reason)
    params: dict[str, Any] = {"payment_method": c.payment_method_id} if c.payment_method_id else {}
    try:
        client.v1.invoices.pay(c.invoice_id, params,  # type: ignore[arg-type]
                               {"idempotency_key": c.idempotency_key})
    except stripe.CardError as exc:
        detail = f"card_error: {exc.code or ''} {getattr(exc.error, 'decline_code', None) or ''}".strip()
        return _attempt_failed(engine, retry_id, c, detail)
    except stripe.RateLimitError as exc:
        # Rejected before it ran: this request charged nothing, so the row goes back to the state it
        # was claimed in. Claimed from charging, an earlier try may have charged: it stays charging
        # (in flight for the bad-debt payment; counted as sent if it is no longer due).
        _set_state(engine, retry_id, c.prior_state, "rate limited")
        raise TaskFailure(FailureKind.RATE_LIMITED, f"Stripe rate limit: {exc.user_message or exc}",
                          retry_after=retry_after_seconds(exc.headers)) from exc
    except stripe.APIConnectionError as exc:
        # No answer: it may or may not have run. It stays charging; the task retries with the
        # same idempotency key, so if it did run Stripe replays that answer.
        _set_state(engine, retry_id, "charging", f"{exc.__class__.__name__}: no answer from Stripe")
        raise TaskFailure(FailureKind.REMOTE_UNAVAILABLE, "Stripe did not answer (connection error or timeout)") \
            from exc
    except stripe.APIError as exc:
        if exc.http_status == 409:
            # A request with this key is still running at Stripe (typically the one a killed worker
            # sent before this redelivery); once it ends Stripe replays its outcome for the key, so
            # stay charging and ask again.
            _set_state(engine, retry_id, "charging", "Stripe is still running this attempt (409)")
            raise TaskFailure(FailureKind.REMOTE_UNAVAILABLE, "Stripe is still running a request with this key") \
                from exc
        # A 5xx means the request started running and its outcome is indeterminate; Stripe saves
        # that answer for the key, so retrying would only replay it. The webhook tells what
        # happened; if nothing did, compute plans afresh once the guard window has passed.
        detail = f"indeterminate: Stripe answered {exc.http_status}; waiting for the webhook"
        _set_state(engine, retry_id, "sent", detail)
        return PayResult(retry_id, "indeterminate", c.account_id, c.failure_class, detail)
    except (stripe.InvalidRequestError, stripe.AuthenticationError, stripe.PermissionError,
            stripe.IdempotencyError) as exc:  # IdempotencyError (400): key reused with other parameters
        if exc.code in AWAITING_AUTHENTICATION:
            return _attempt_failed(engine, retry_id, c, f"requires_action: {exc.code}")
        # Refused before anything was charged: no attempt, so it spends none of the invoice's budget.
        # An invoice paid or voided meanwhile (the customer paid on the hosted page before its webhook
        # came) is the dunning's success: mirrored as Stripe has it, and the retry skipped.
        # Stripe could not show it for now (a rate limit, no answer, a 5xx): nothing was charged and
        # nothing said the request is wrong, so no refusal (dead work, the refused backoff) either. The
        # row goes back to the state it was claimed in and the task asks again with its backoff; the
        # request sent again is refused again (or replayed), and the invoice read again.
        try:
            closed = _closed_at_stripe(client, c.invoice_id) if isinstance(exc, stripe.InvalidRequestError) else None
        except NOT_SHOWN_NOW as read_exc:
            raise _not_shown(engine, retry_id, c, read_exc, "after it refused the charge") from read_exc
        if closed is not None:
            detail = f"not due: invoice {closed['status']} at Stripe when charged"
            _skip_closed(engine, retry_id, c.account_id, closed, detail)
            return PayResult(retry_id, "skipped", c.account_id, c.failure_class, detail, requested=True)
        # Anything else (a revoked key, a missing permission): compute waits a while before the next
        # one, and the task still fails, for an operator, once it has sent the recompute.
        detail = f"{exc.__class__.__name__}: {exc.http_status} {exc.code or ''}".strip()
        _refuse(engine, retry_id, c.account_id, detail)
        return PayResult(retry_id, "refused", c.account_id, c.failure_class, detail, requested=True,
                         credentials_refused=isinstance(exc, KEY_REFUSED))
    _set_state(engine, retry_id, "sent")
    return PayResult(retry_id, "sent", c.account_id, c.failure_class)


def _not_shown(engine: Engine, retry_id: int, c: Claimed, exc: stripe.StripeError, when: str) -> TaskFailure:
    """Stripe could not show the retry's invoice (an error of NOT_SHOWN_NOW): the row goes back to the
    state it was claimed in (nothing was charged), and the task's failure, by the error's class
    (a rate limit with its Retry-After), to raise."""
    _set_state(engine, retry_id, c.prior_state, f"invoice not shown by Stripe: {exc.__class__.__name__}")
    limited = isinstance(exc, stripe.RateLimitError)
    return TaskFailure(FailureKind.RATE_LIMITED if limited else FailureKind.REMOTE_UNAVAILABLE,
                       f"Stripe could not show invoice {c.invoice_id} {when}",
                       retry_after=retry_after_seconds(exc.headers) if limited else None)


def _attempt_failed(engine: Engine, retry_id: int, c: Claimed, detail: str) -> PayResult:
    """Stripe made the attempt and it did not pay: the retry is spent, and the invoice's webhooks say
    why (the decline code, or the authentication the issuer asks for)."""
    _set_state(engine, retry_id, "failed", detail)
    return PayResult(retry_id, "failed", c.account_id, c.failure_class, detail)


# Errors that say nothing of the invoice, only that Stripe could not show it for now.
NOT_SHOWN_NOW = (stripe.RateLimitError, stripe.APIConnectionError, stripe.APIError)


def _at_stripe(client: stripe.StripeClient, invoice_id: str, statuses: Collection[str],
               raise_not_shown: bool = False) -> dict[str, Any] | None:
    """Stripe's invoice when its status there is one of ``statuses``; None when it is not, or Stripe
    did not say (the caller then goes on as it would have). With ``raise_not_shown``, an error of
    NOT_SHOWN_NOW (a rate limit, no answer, a 5xx) is raised instead."""
    try:
        invoice = client.v1.invoices.retrieve(invoice_id)
    except stripe.StripeError as exc:
        if raise_not_shown and isinstance(exc, NOT_SHOWN_NOW):
            raise
        log.warning("could not read invoice %s at Stripe: %s", invoice_id, exc.__class__.__name__)
        return None
    found: dict[str, Any] = invoice.to_dict()
    return found if found.get("status") in statuses else None


def _closed_at_stripe(client: stripe.StripeClient, invoice_id: str) -> dict[str, Any] | None:
    """After Stripe refused a retry: its invoice when paid or void there. Raises the StripeError when
    Stripe could not show it for now (NOT_SHOWN_NOW): read as "not closed", the refusal of a retry of
    an invoice the customer just paid was filed as a refused request, dead work for an operator."""
    return _at_stripe(client, invoice_id, SETTLED_STATUSES, raise_not_shown=True)


def _uncollectible_at_stripe(client: stripe.StripeClient, invoice_id: str) -> dict[str, Any] | None:
    """Before a retry: its invoice when uncollectible there (Stripe refuses a paid or void invoice
    itself, see _charge, but pays an uncollectible one). Raises the StripeError when Stripe could
    not show it for now (a rate limit, no answer, a 5xx): paid blind, a written-off debt would be
    collected. Any other error (an invoice Stripe does not show, a key it refuses) goes on to the
    charge, which Stripe refuses in turn."""
    return _at_stripe(client, invoice_id, ("uncollectible",), raise_not_shown=True)


def _skip_closed(engine: Engine, retry_id: int, account_id: str, invoice: dict[str, Any], detail: str) -> None:
    """Mirror the invoice as Stripe has it (under the ordering guard, as its webhook would), skip the
    retry and request the account's recompute, in one transaction; the request row, the mirror row,
    then the retry row: the order webhook ingest and a settlement lock them in."""
    event_type = MIRRORED_AS.get(str(invoice.get("status")), "invoice.voided")
    with unit_of_work(engine) as conn:
        request_recompute(conn, account_id, Trigger.STATE_REFRESH.value, f"retry:{retry_id}:closed")
        for row in mirror_rows(event_type, f"payment_retry_{retry_id}", invoice):
            upsert_row(conn, row)
        conn.exec_driver_sql(SET_STATE_SQL, {"id": retry_id, "state": "skipped", "error": detail})
    return None
