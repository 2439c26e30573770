"""POST /pay-bad-debt: the isolated bad-debt payment (its own path, never the regular retries).

Guards, in order: a valid body, the Idempotency-Key (the same key replays the first answer, the
same key with another body is refused), an account that exists and is in bad debt, the exact
outstanding balance, a balance a card can be charged (in Stripe's three-decimal currencies a
multiple of 10 minor units: the amount is never rounded), one payment in flight per account (a
partial unique index, so two concurrent requests cannot both pass), no automatic retry being
charged on the account or the invoices, and none of another account in flight on the invoices (made
before another team moved their customer to this account, or by the account it moved to; both are
checked under the debt's customer's lock as well as the account's, so two such requests cannot both
pass either). Then:

1. the ``bad_debt_payment`` row (pending) is committed, with a recompute request in the same
   transaction (recompute turns the account into ``lifting`` while the row is pending; the request
   row means beat re-drives it if the broker is down);
2. a PaymentIntent for the amount is created and confirmed off-session on the customer's default
   payment method (else its latest attached one; one the mirror knows as detached, or as a card
   expired, is passed over as the retries pass it over; none left is a 409 no_payment_method,
   before anything is stored) through the stripe library, with an idempotency key derived from the
   Idempotency-Key and metadata naming the account and the payment;
3. the answer (202 pending, 402 declined, 502 provider error) is stored on the row for replays.
   A definite failure (declined, refused) ends the payment and requests a recompute in the same
   transaction. No answer or a server error from Stripe leaves the outcome unknown: the payment
   stays pending (502, state pending) until the intent's webhook reports it, so the customer
   cannot be charged twice; one that never comes shows in the stuck-in-lifting gauge and list.
   A request Stripe surely did not run (rate limited, its key not accepted, no connection made)
   stores nothing, as Stripe keeps nothing under its own key then: the row is removed with a
   recompute request, and the answer is 503 with Retry-After; the same key may be sent again.

The PaymentIntent's webhooks decide the rest (app/payments/bad_debt_webhook.py and
app/payments/bad_debt_settle.py): success settles the invoices and the account leaves bad debt;
failure returns it to bad debt with the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
import stripe
from psycopg2.extras import Json
from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from urllib3.exceptions import NewConnectionError

from app import metrics
from app.db import unit_of_work
from app.dispatch import BrokerUnavailable, enqueue_recompute
from app.domain.compute import compute
from app.domain.retry_cadence import attempt_in_flight, passed_over
from app.domain.snapshot import Snapshot, decision_moment
from app.domain.state import Status
from app.domain.triggers import Trigger
from app.money import exponent, money
from app.payments.bad_debt_settle import NOT_RUN, customer_paid
from app.payments.bad_debt_webhook import enqueue_settlement, reopen_charged
from app.payments.pay import lock_account_payments, lock_customer_payments, retry_charging
from app.payments.stripe_client import KEY_REFUSED, make_stripe_client
from app.recompute.gather import gather
from app.runtime import Runtime
from tasks.failures import retry_after_seconds

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 255
IN_FLIGHT_INDEX = "uq_bad_debt_payment_in_flight"
KEY_INDEX = "uq_bad_debt_payment_idempotency_key"
RETRY_AFTER_DEFAULT = 2  # seconds, when Stripe names none: its rate limits count per second
RETRY_AFTER_CAP = 60  # the most we pass on: a caller is not parked for long by a wrong header


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class Refused(Exception):
    def __init__(self, status: int, error: str, reason: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(reason)
        self.answer = Answer(status, {"error": error, "reason": reason, **extra}, headers or {})


class NotRun(Exception):
    """Stripe did not run the request that creates the intent: nothing was charged, and Stripe
    kept nothing under its idempotency key."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.body["reason"])
        self.answer = answer


@dataclass(frozen=True)
class Request:
    account_id: str
    amount: int
    idempotency_key: str

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps({"account_id": self.account_id, "amount": self.amount}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def stripe_idempotency_key(self) -> str:
        # Derived from the caller's key: the same request can never create two PaymentIntents.
        return "pay-bad-debt-" + hashlib.sha256(f"{self.account_id}\0{self.idempotency_key}".encode()).hexdigest()


def parse(body: Any, idempotency_key: str | None) -> Request:
    key = (idempotency_key or "").strip()
    if not key:
        raise Refused(400, "idempotency_key_required", "the Idempotency-Key header is required")
    if len(key) > MAX_KEY_LENGTH:
        raise Refused(400, "invalid_idempotency_key", f"the Idempotency-Key is longer than {MAX_KEY_LENGTH}")
    if not isinstance(body, dict):
        raise Refused(400, "invalid_body", 'the body must be a JSON object {"account_id", "amount"}')
    account_id, amount = body.get("account_id"), body.get("amount")
    # The id as sent, never trimmed: account ids are other teams' text, blanks included, and " x"
    # trimmed would be (and pay) the account "x".
    if not isinstance(account_id, str) or not account_id:
        raise Refused(400, "invalid_account_id", "account_id must be a non-empty string")
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise Refused(400, "invalid_amount",
                      "amount must be an integer in the currency's minor unit (cents for usd, yen for jpy)")
    if amount <= 0:
        raise Refused(400, "invalid_amount", "amount must be positive")
    unknown = sorted(set(body) - {"account_id", "amount"})
    if unknown:
        raise Refused(400, "invalid_body", f"unknown fields: {', '.join(unknown)}")
    return Request(account_id, amount, key)


FIND_BY_KEY = """
SELECT id, account_id, request_fingerprint, response_status, response_body, state, failure_reason, amount,
       currency, stripe_payment_intent_id
  FROM bad_debt_payment WHERE idempotency_key = %(key)s
"""


def _replay(conn: Connection, req: Request) -> Answer | None:
    row = conn.exec_driver_sql(FIND_BY_KEY, {"key": req.idempotency_key}).mappings().first()
    if row is None:
        return None
    if row["request_fingerprint"] != req.fingerprint:
        raise Refused(422, "idempotency_key_reused",
                      "this Idempotency-Key was used with a different request body; use a new key")
    if row["response_status"] is None:
        if row["state"] == "pending":
            raise Refused(409, "request_in_progress", "a request with this Idempotency-Key is still being processed")
        # The request never saved Stripe's answer (it died on the way), and the payment has ended
        # since (its webhook, or the reconciliation with Stripe): the outcome is the answer.
        return _outcome(row)
    body = dict(row["response_body"] or {})
    if body.get("error") == "payment_outcome_unknown" and row["state"] != "pending":
        return _outcome(row)  # "unknown" was provisional, and it is known now
    return Answer(int(row["response_status"]), body)


def _outcome(row: Any) -> Answer:
    body = {"payment_id": int(row["id"]), "account_id": row["account_id"], "amount": int(row["amount"]),
            "currency": row["currency"], "state": row["state"],
            "stripe_payment_intent_id": row["stripe_payment_intent_id"]}
    if row["state"] == "succeeded":
        return Answer(200, body)
    return Answer(402, {**body, "error": "payment_failed", "reason": row["failure_reason"] or "failed"})


@dataclass(frozen=True)
class Debt:
    balance: int
    currency: str
    invoice_ids: list[str]
    customer: str
    payment_method: str
    # The customer's own payments on each invoice as Stripe lists them when the balance is quoted:
    # settlement counts those beyond it as paid twice (bad_debt_settle), measured the same way.
    paid_before: dict[str, int] = field(default_factory=dict)
    # What each invoice owed at Stripe when the balance was quoted, and its credit notes so far: a
    # credit note since then lowered it with no payment, and the charge took the quote all the same.
    quoted: dict[str, dict[str, int]] = field(default_factory=dict)
    # The account's newest bad-debt payment when the balance was quoted (0: none): one made since
    # (another request's, settled while this one asked Stripe) may have paid this very debt.
    newest_payment: int = 0


CUSTOMERS_OF = "SELECT DISTINCT stripe_customer_id FROM stripe_invoice WHERE id = ANY(%(ids)s)"


def _debt(conn: Connection, rt: Runtime, req: Request, now: datetime) -> Debt:
    """The account's bad debt as compute sees it now; refuses anything else."""
    gathered = gather(conn, req.account_id)
    if gathered is None:
        raise Refused(404, "not_found", f"no account {req.account_id!r}")
    snapshot, _ = gathered
    # Judged at the moment a recompute of the account would decide at, never before the stored
    # decision quoted here: on a web host whose clock is behind the worker's that put the account in
    # bad debt at its boundary, its own clock alone sees no bad debt yet and refuses a balance that
    # is not changing, with no recompute on its way.
    now = decision_moment(snapshot, now)
    stored = snapshot.stored
    status = stored.status if stored is not None else Status.CURRENT.value
    if status == Status.LIFTING.value or any(p.state == "pending" for p in snapshot.bad_debt_payments):
        raise Refused(409, "payment_in_flight", "a bad-debt payment for this account is already in flight")
    if snapshot.payments_elsewhere:  # its debt held below bad debt meanwhile (guard.payment_elsewhere)
        _refuse_if_covered(conn, req.account_id, [inv.id for inv in snapshot.invoices])
    if status != Status.BAD_DEBT.value or stored is None:
        raise Refused(409, "not_in_bad_debt", f"the account is not in bad debt (status {status})")
    guard = timedelta(minutes=rt.policy.guard_window_minutes)
    if any(attempt_in_flight(a, now, guard) for a in snapshot.attempts):
        # The customer is paying some other way right now (a Stripe attempt without its outcome).
        raise Refused(409, "payment_in_flight", "a payment attempt for this account is being processed by "
                      "Stripe; try again once its outcome is in (the balance may change)")
    decision = compute(snapshot, rt.policy, now)
    invoices = [a.invoice for a in decision.assessments]
    balance = sum(inv.amount_remaining for inv in invoices)
    if decision.state.status != Status.BAD_DEBT.value or balance != stored.outstanding_amount or (
            stored.outstanding is not None and decision.state.outstanding != stored.outstanding):
        # Something arrived since the last recompute (which is on its way): the stored balance is stale.
        # Per currency too: the caller quoted the stored amount in its currency (the body names none),
        # and the same number owed in another currency is another balance.
        raise Refused(409, "balance_changing", "the account's balance is being recomputed; retry in a moment")
    # Before the amount: a sum across currencies is no balance anyone could pay.
    currencies = {inv.currency for inv in invoices}
    ids = [inv.id for inv in invoices]
    customers = [r[0] for r in conn.exec_driver_sql(CUSTOMERS_OF, {"ids": ids})]
    if len(currencies) != 1 or len(customers) != 1:
        raise Refused(409, "mixed_debt", "the debt spans several currencies or Stripe customers; "
                      "settle it through support")
    currency = next(iter(currencies))
    if req.amount != balance:
        # The reason is prose for a person (major units, app/money.py); it names the integer to send
        # too, as the body's amount is in minor units. The fields stay the integers the API takes.
        raise Refused(422, "amount_mismatch", f"amount must equal the outstanding balance exactly: "
                      f"{money(balance, currency)}, that is amount {balance} in the currency's minor units; "
                      f"{money(req.amount, currency)} was sent", outstanding_amount=balance,
                      outstanding_currency=currency)
    if not chargeable_by_card(balance, currency):
        # Stripe refuses (400) a card payment in a three-decimal currency whose minor units do not end
        # in 0; the payment is for the balance exactly, never rounded, so no attempt could go through:
        # refused before anything is stored or Stripe is asked anything.
        raise Refused(409, "amount_not_chargeable", f"the outstanding balance {money(balance, currency)} cannot be "
                      f"charged by card in {currency.upper()}: card payments in that currency must be a whole "
                      f"multiple of {money(10, currency)}; settle it through support")
    method = _method_to_charge(snapshot, customers[0], now)
    if method is None:
        expired = _expired_cards(snapshot, customers[0], now)
        if expired:
            # Stripe declines an expired card (expired_card): the customer's attempt spent and a decline
            # on the network for nothing. Refused before anything is stored or Stripe is asked anything.
            raise Refused(409, "no_payment_method", f"the customer has no usable payment method on file: "
                          f"{expired} (a card is valid through the last day of its expiry month, UTC) and no "
                          "other attached one; nothing was charged: the customer must add a card")
        raise Refused(409, "no_payment_method", "the customer has no payment method on file to charge")
    newest = max((p.id for p in snapshot.bad_debt_payments), default=0)
    return Debt(balance, currency, ids, customers[0], method, newest_payment=newest)


def chargeable_by_card(amount: int, currency: str) -> bool:
    """Whether Stripe takes a card payment of ``amount`` (minor units): in its three-decimal currencies
    (bhd, jod, kwd, omr, tnd) only a multiple of 10, as card networks charge them to the hundredth."""
    return exponent(currency) != 3 or amount % 10 == 0


def _method_to_charge(snapshot: Snapshot, customer: str, at: datetime) -> str | None:
    """The debt's customer's default payment method, else its latest attached one: Stripe charges
    a customer only with a method of its own, and an account may have several customers. As the
    retries do (retry_cadence.passed_over), a method the mirror knows as detached (Stripe clears the
    default in a customer.updated that may come after the detachment, and refuses to charge it) or a
    card it knows as expired at ``at`` (Stripe declines it: expired_card) is passed over, the
    default as any other: a default card known as expired is read as a detached one."""
    default = snapshot.default_of(customer)[0]
    if default is not None and not passed_over(snapshot, default, at):
        return default
    usable = [pm for pm in snapshot.methods_of(customer) if pm.attached and not passed_over(snapshot, pm.id, at)]
    return max(usable, key=lambda pm: pm.changed_at).id if usable else None


def _expired_cards(snapshot: Snapshot, customer: str, at: datetime) -> str:
    """The debt's customer's attached cards expired at ``at``, the default first, for a refusal's
    reason ("" when none)."""
    default = snapshot.default_of(customer)[0]
    expired = sorted((pm for pm in snapshot.methods_of(customer) if pm.attached and pm.expired(at)),
                     key=lambda pm: (pm.id != default, pm.id))
    return ", ".join(f"{'the default card' if pm.id == default else 'card'} {pm.id} expired "
                     f"{pm.exp_month:02d}/{pm.exp_year}" for pm in expired)


NEXT_PAYMENT_ID = "SELECT nextval(pg_get_serial_sequence('bad_debt_payment', 'id'))"
INSERT_PAYMENT = """
INSERT INTO bad_debt_payment (id, account_id, idempotency_key, request_fingerprint, amount, currency, invoice_ids,
                              stripe_customer_id, invoices_paid_before, invoices_quoted)
VALUES (%(id)s, %(account)s, %(key)s, %(fp)s, %(amount)s, %(currency)s, %(invoices)s, %(customer)s, %(paid_before)s,
        %(quoted)s)
"""


PAYMENT_SINCE = """
SELECT state FROM bad_debt_payment WHERE account_id = %(account)s AND id > %(id)s ORDER BY id DESC LIMIT 1
"""


def _insert(rt: Runtime, req: Request, debt: Debt) -> tuple[int, bool]:
    """Commit the pending row and the recompute request; (payment id, whether to enqueue)."""
    from webhooks.store import request_recompute

    try:
        with unit_of_work(rt.engine) as conn:
            lock_account_payments(conn, req.account_id)
            # And the debt's customer's: a request or retry of another account that the customer was
            # moved to or from meanwhile takes it too, and whichever commits second sees the other.
            lock_customer_payments(conn, debt.customer)
            if retry_charging(conn, req.account_id, datetime.now(UTC),
                              timedelta(minutes=rt.policy.guard_window_minutes), debt.invoice_ids):
                raise Refused(409, "payment_in_flight", "an automatic payment retry for this account or one of "
                              "the invoices is being charged; try again once its outcome is in (the balance may "
                              "change)")
            # Under the lock every payment takes: another request's payment made since the quote
            # (charged, and settled, while this one asked Stripe about the invoices) leaves the
            # in-flight index once it succeeds, and may have paid this very debt.
            since = conn.exec_driver_sql(PAYMENT_SINCE, {"account": req.account_id, "id": debt.newest_payment}).first()
            if since is not None and since[0] == "pending":
                raise Refused(409, "payment_in_flight", "a bad-debt payment for this account is already in flight")
            if since is not None:
                raise Refused(409, "balance_changing", "another bad-debt payment of the account was made since "
                              "the balance was quoted; retry in a moment")
            _refuse_covered_elsewhere(conn, req, debt)
            # The request row before the payment's entry in the in-flight index: the order a success
            # webhook reopening a failed payment takes them in (ingest, then record_outcome).
            payment_id = int(conn.exec_driver_sql(NEXT_PAYMENT_ID).scalar_one())
            created = request_recompute(conn, req.account_id, Trigger.BAD_DEBT_PAID.value,
                                        f"bad_debt_payment:{payment_id}")
            conn.exec_driver_sql(INSERT_PAYMENT, {
                "id": payment_id, "account": req.account_id, "key": req.idempotency_key, "fp": req.fingerprint,
                "amount": req.amount, "currency": debt.currency, "invoices": Json(debt.invoice_ids),
                "customer": debt.customer, "paid_before": Json(debt.paid_before), "quoted": Json(debt.quoted),
            })
    except IntegrityError as exc:
        constraint = getattr(getattr(exc.orig, "diag", None), "constraint_name", None)
        if constraint == IN_FLIGHT_INDEX:
            raise Refused(409, "payment_in_flight",
                          "a bad-debt payment for this account is already in flight") from None
        if constraint != KEY_INDEX:
            raise
        # The same key, committed by a concurrent request meanwhile: answer as a replay would.
        with rt.engine.connect() as conn:
            replayed = _replay(conn, req)  # raises Refused while that request is still running
        if replayed is None:
            # Its payment was removed since (Stripe did not run it): nothing is kept for the key, and
            # this request, sent again, runs.
            raise Refused(409, "request_in_progress", "a request with this Idempotency-Key was being processed "
                          "and kept nothing; send this one again") from None
        raise Replayed(replayed) from None
    return payment_id, created


# Another account's payment in flight on one of the invoices: it made its payment before another team
# moved the invoices' Stripe customer to this account (subs_customer), or after the customer moved
# from this account to it (this request quoted before the move), and may still charge them.
COVERED_ELSEWHERE = """
SELECT id, account_id, invoice FROM bad_debt_payment, jsonb_array_elements_text(invoice_ids) AS invoice
 WHERE state = 'pending' AND account_id <> %(account)s AND invoice = ANY(%(ids)s)
 ORDER BY id, invoice LIMIT 1
"""


def _refuse_covered_elsewhere(conn: Connection, req: Request, debt: Debt) -> None:
    """Under the account's payment lock and the debt's customer's: the other account's request for
    the same invoices (its quote read before or after the move) takes that customer's lock too, so
    whichever of the two commits second sees the first's payment here, and is refused."""
    _refuse_if_covered(conn, req.account_id, debt.invoice_ids)


def _refuse_if_covered(conn: Connection, account_id: str, invoice_ids: list[str]) -> None:
    """Refuse paying ``invoice_ids`` while another account's payment in flight covers one of them."""
    found = conn.exec_driver_sql(COVERED_ELSEWHERE, {"account": account_id, "ids": invoice_ids}).first()
    if found is not None:
        raise Refused(409, "payment_in_flight", f"bad-debt payment {found[0]} of account {found[1]!r} is in flight "
                      f"for invoice {found[2]}, which this payment would cover; try again once its outcome is in")


class Replayed(Refused):
    def __init__(self, answer: Answer) -> None:
        Exception.__init__(self, "replayed")
        self.answer = answer


def _create_intent(rt: Runtime, req: Request, debt: Debt, payment_id: int) -> tuple[Answer, str | None, str | None]:
    """(answer, payment intent id, failure reason or None while pending) after asking Stripe to charge."""
    client = make_stripe_client(rt.settings)
    params: dict[str, Any] = {
        "amount": req.amount, "currency": debt.currency, "customer": debt.customer,
        "payment_method": debt.payment_method, "confirm": True, "off_session": True,
        # Off session there is no customer to send anywhere: without this, Stripe refuses the intent
        # (400, a return_url required) as soon as the Dashboard enables any method that may redirect.
        "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
        "description": f"Bad-debt payment {payment_id} for account {req.account_id}",
        "metadata": {"account_id": req.account_id, "bad_debt_payment_id": str(payment_id)},
    }
    base = {"payment_id": payment_id, "account_id": req.account_id, "amount": req.amount, "currency": debt.currency}
    try:
        intent = client.v1.payment_intents.create(params,  # type: ignore[arg-type]
                                                  {"idempotency_key": req.stripe_idempotency_key})
    except stripe.CardError as exc:
        err = exc.error
        code = (getattr(err, "decline_code", None) or getattr(err, "code", None) or exc.code or "card_declined")
        intent_id = getattr(getattr(err, "payment_intent", None), "id", None) if err is not None else None
        reason = f"declined: {code}"
        return Answer(402, {**base, "state": "failed", "error": "payment_declined", "reason": reason}), \
            intent_id, reason
    except stripe.StripeError as exc:
        status = exc.http_status or "no answer"
        log.warning("bad-debt payment %s: Stripe error %s (%s)", payment_id, exc.__class__.__name__, status)
        if _not_run(exc):
            raise NotRun(_unavailable(exc, f"Stripe did not run the payment ({_why(exc)}): nothing was charged "
                                           "and nothing is kept for this Idempotency-Key; send the same request "
                                           "again after Retry-After")) from exc
        if _indeterminate(exc):
            # The charge may have run: Stripe's webhook for the intent (found by its metadata) will say.
            # Until then the payment stays in flight, so the account stays lifting and no second
            # payment can start (it could charge the customer twice).
            return _unknown(req, debt, payment_id, f"{exc.__class__.__name__} ({status})"), None, None
        reason = f"payment provider error: {exc.__class__.__name__} ({status})"
        return Answer(502, {**base, "state": "failed", "error": "payment_provider_error", "reason": reason}), \
            None, reason
    body = {**base, "state": "pending", "stripe_payment_intent_id": intent.id, "stripe_status": intent.status}
    return Answer(202, body), str(intent.id), None


def _unknown(req: Request, debt: Debt, payment_id: int, why: str) -> Answer:
    reason = f"outcome unknown: {why}; the payment stays in flight until Stripe reports it"
    return Answer(502, {"payment_id": payment_id, "account_id": req.account_id, "amount": req.amount,
                        "currency": debt.currency, "state": "pending", "error": "payment_outcome_unknown",
                        "reason": reason})


OWING_STATUSES = ("open", "uncollectible")  # a Stripe invoice that can still be owed


def _at_stripe(rt: Runtime, debt: Debt) -> Debt:
    """Before anything is charged, Stripe's own record of the invoices: what each still owes must be
    what the quote says (the mirror may not have heard of a payment made a moment ago, which would
    then be charged twice), and what the customer had paid on each, and what each owed with the
    credit notes issued on it so far, are the baseline of "paid twice"."""
    client = make_stripe_client(rt.settings)
    try:
        found = [client.v1.invoices.retrieve(invoice_id) for invoice_id in debt.invoice_ids]
        paid = {invoice_id: customer_paid(client, invoice_id) for invoice_id in debt.invoice_ids}
    except stripe.StripeError as exc:
        if isinstance(exc, (*NOT_RUN, stripe.APIConnectionError)):  # a read, even unanswered, changed nothing
            answer = _unavailable(exc, f"Stripe could not be asked about the invoices ({_why(exc)}); nothing was "
                                       "charged, send the same request again after Retry-After")
            raise Refused(answer.status, answer.body["error"], answer.body["reason"], answer.headers) from exc
        raise Refused(502, "payment_provider_error", f"Stripe could not be asked about the invoices "
                      f"({exc.__class__.__name__}); nothing was charged, try again") from exc
    closed = [f"{inv.id} is {inv.status}" for inv in found if inv.status not in OWING_STATUSES]
    if closed:
        # Voided (or paid) at Stripe before its webhook came: Stripe leaves a void invoice's
        # amount_remaining as it was, so the sum alone would still match the quote.
        raise Refused(409, "balance_changing", f"Stripe's invoices changed since the quote ({', '.join(closed)}); "
                      "retry in a moment")
    owed = sum(int(inv.amount_remaining or 0) for inv in found)
    if owed != debt.balance:
        raise Refused(409, "balance_changing", "Stripe's invoices do not owe what was quoted yet (a payment "
                      "is being recorded); retry in a moment")
    quoted = {invoice_id: {"amount_remaining": int(inv.amount_remaining or 0),
                           "pre_payment_credit_notes_amount": int(inv.pre_payment_credit_notes_amount or 0)}
              for invoice_id, inv in zip(debt.invoice_ids, found, strict=True)}
    return replace(debt, paid_before=paid, quoted=quoted)


def _indeterminate(exc: stripe.StripeError) -> bool:
    """Whether Stripe may have run the request: no answer at all, or a server error (Stripe's advice
    is to treat a 5xx's outcome as unknown). A card decline or a refused request are definite:
    nothing was charged."""
    if isinstance(exc, stripe.APIConnectionError):
        return True
    return isinstance(exc, stripe.APIError) and (exc.http_status is None or exc.http_status >= 500)


def _not_run(exc: stripe.StripeError) -> bool:
    """Whether Stripe surely did not run the request: refused before any endpoint ran (a rate limit:
    Stripe's limiters come before its idempotency layer; a key it does not accept), or a connection
    never made (refused, the host not found, the connect timed out), so nothing was sent. A
    connection lost once made, or a read timeout, may have run it."""
    if isinstance(exc, NOT_RUN):
        return True
    return isinstance(exc, stripe.APIConnectionError) and _never_connected(exc.__cause__)


def _never_connected(cause: BaseException | None) -> bool:
    """The stripe library's RequestsClient raises APIConnectionError from the requests exception;
    requests raises ConnectionError(MaxRetryError(reason=NewConnectionError)) when no connection
    was made, and ConnectTimeout when making it timed out."""
    if isinstance(cause, requests.exceptions.ConnectTimeout):
        return True
    if not isinstance(cause, requests.exceptions.ConnectionError) or not cause.args:
        return False
    return isinstance(getattr(cause.args[0], "reason", None), NewConnectionError)


NOT_RUN_WHY = {"rate_limited": "rate limited", "no_connection": "no connection could be made", "no_answer": "no answer"}


def _why(exc: stripe.StripeError) -> str:
    """_kind in words, for the answer's reason."""
    kind = _kind(exc)
    return f"refused: {exc.__class__.__name__} ({exc.http_status})" if kind == "key_refused" else NOT_RUN_WHY[kind]


def _kind(exc: stripe.StripeError) -> str:
    """Why Stripe did not run (or answer) the request, as dunning_bad_debt_payments_not_run_total counts it."""
    if isinstance(exc, stripe.RateLimitError):
        return "rate_limited"
    if isinstance(exc, KEY_REFUSED):
        return "key_refused"
    return "no_connection" if _never_connected(exc.__cause__) else "no_answer"


def _unavailable(exc: stripe.StripeError, reason: str) -> Answer:
    """503 with Stripe's Retry-After (else a small default): nothing was done, the same request
    later is expected to go through. Counted by why. A key Stripe refuses is ours to fix: every
    customer's payment is refused so until an operator replaces it, so it is an error in the log,
    and callers are asked to wait the longest we ask, not to come back every 2 seconds."""
    why = _kind(exc)
    metrics.BAD_DEBT_NOT_RUN.labels(why).inc()
    if why == "key_refused":
        log.error("bad-debt payments: Stripe refuses our API key (%s, %s): no customer can pay their bad debt "
                  "until the key is replaced or given the permission", exc.__class__.__name__, exc.http_status)
        seconds = RETRY_AFTER_CAP
    else:
        asked = retry_after_seconds(exc.headers)
        seconds = RETRY_AFTER_DEFAULT if asked is None else min(max(math.ceil(asked), 1), RETRY_AFTER_CAP)
    return Answer(503, {"error": "payment_provider_unavailable", "reason": reason}, {"Retry-After": str(seconds)})


# Stripe did not run the payment: it never was one. Without its row the key is free again (as Stripe's
# own key is) and so is the account's in-flight slot. Only while nothing else has touched it.
RELEASE = """
DELETE FROM bad_debt_payment WHERE id = %(id)s AND state = 'pending' AND stripe_payment_intent_id IS NULL
"""
SAVE_ANSWER = """
UPDATE bad_debt_payment
   SET stripe_payment_intent_id = COALESCE(stripe_payment_intent_id, %(intent)s),
       state = CASE WHEN %(failure)s::text IS NULL OR state <> 'pending' THEN state ELSE 'failed' END,
       failure_reason = CASE WHEN state = 'pending' THEN COALESCE(%(failure)s, failure_reason)
                             ELSE failure_reason END,
       response_status = %(status)s, response_body = %(body)s, updated_at = now()
 WHERE id = %(id)s
"""


def _refuse_without_key(rt: Runtime) -> None:
    """Without STRIPE_API_KEY (make run's default) nothing can be charged: a 503 that names the
    setting, before Stripe is asked anything (with an empty key api.stripe.com answers 401, which
    read as "Stripe refuses our key") and before anything is stored under the Idempotency-Key."""
    if rt.settings.stripe_api_key:
        return
    log.error("bad-debt payments: STRIPE_API_KEY is not set: no customer can pay their bad debt until it is")
    raise Refused(503, "payment_provider_unavailable", "STRIPE_API_KEY is not set on this service: nothing was "
                  "charged; send the same request again once it is configured",
                  {"Retry-After": str(RETRY_AFTER_CAP)})


def pay_bad_debt(rt: Runtime, celery_app: Any, body: Any, idempotency_key: str | None,
                 now: datetime | None = None) -> Answer:
    from webhooks.store import request_recompute

    try:
        req = parse(body, idempotency_key)
        with rt.engine.connect() as conn:
            replayed = _replay(conn, req)
        if replayed is not None:
            return replayed
        _refuse_without_key(rt)
        with rt.engine.connect() as conn:
            try:
                debt = _debt(conn, rt, req, now or datetime.now(UTC))
            except Refused as refused:
                # The payment in flight may be this very request's, committed by a duplicate that
                # ran alongside since the key was looked up: answer as a replay of the key does.
                if refused.answer.body.get("error") == "payment_in_flight":
                    replayed = _replay(conn, req)
                    if replayed is not None:
                        return replayed
                raise
        debt = _at_stripe(rt, debt)
        payment_id, enqueue = _insert(rt, req, debt)
    except Refused as refused:
        return refused.answer
    # From here on the payment exists: whatever fails, it stays in flight (the account lifting)
    # until Stripe's webhook or the reconciliation with Stripe (bad_debt_reconcile.py) ends it,
    # unless Stripe surely did not run it.
    released = False
    try:
        answer, intent_id, failure = _create_intent(rt, req, debt, payment_id)
    except NotRun as not_run:
        answer, intent_id, failure, released = not_run.answer, None, None, True
    except Exception:
        log.exception("bad-debt payment %s: asking Stripe failed unexpectedly", payment_id)
        answer, intent_id, failure = _unknown(req, debt, payment_id, "an unexpected error while asking Stripe"), \
            None, None
    reopened = None
    ended = failure is not None or released
    try:
        with unit_of_work(rt.engine) as conn:
            if ended:
                # A recompute may have run (and taken the request _insert made) while Stripe was being
                # asked, and stored "lifting": this one must see the end, or the account stays lifting.
                # The request row before the payment row: the order the intent's webhook locks them in
                # (ingest, then record_outcome), so the two cannot deadlock.
                enqueue = request_recompute(conn, req.account_id, Trigger.BAD_DEBT_PAID.value,
                                            f"bad_debt_payment:{payment_id}") or enqueue
            if released:
                conn.exec_driver_sql(RELEASE, {"id": payment_id})
            else:
                conn.exec_driver_sql(SAVE_ANSWER, {"intent": intent_id, "failure": failure, "status": answer.status,
                                                   "body": Json(answer.body), "id": payment_id})
            if ended:  # the in-flight slot is free: an earlier payment charged after all takes it
                reopened = reopen_charged(conn, req.account_id)
    except SQLAlchemyError:
        # Stripe's answer is still the truth about the charge: say it. The key answers "in
        # progress" until the payment is reconciled, then its outcome.
        log.exception("bad-debt payment %s: Stripe's answer (%s) could not be saved", payment_id, answer.status)
        return answer
    if reopened is not None:
        enqueue_settlement(celery_app, reopened)
    if enqueue:
        try:
            enqueue_recompute(celery_app, req.account_id, Trigger.BAD_DEBT_PAID.value, f"bad_debt_payment:{payment_id}")
        except BrokerUnavailable as exc:  # the committed request row is re-driven by beat
            log.warning("recompute after bad-debt payment %s not queued: %s", payment_id, exc)
    return answer
