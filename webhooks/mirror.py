"""From a Stripe event to the rows of the invoice / attempt / subscription / payment-method mirror.

Pure: a decoded event in, ``MirrorRow``s out. Every row carries its ordering key
``(source_created, source_rank)``: the event's ``created`` second and, for events of the same second,
how far along the object's life the status is. The upsert (webhooks/store.py) lets a row overwrite
the stored one only when its key is not older, so an older event never overwrites newer data
and delivery order does not change the result.

Stripe's enums are open: an unknown status or code is stored as it is, never rejected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from app.domain.triggers import Trigger, trigger_for

INVOICE_RANK = {"draft": 0, "open": 1, "uncollectible": 2, "paid": 3, "void": 3}
ATTEMPT_RANK = {"pending": 0, "processing": 0, "requires_action": 0, "failed": 1, "succeeded": 2}
# A subscription's events of the same second, by what can only come later. An ended subscription
# (canceled, incomplete_expired) never becomes live again: a terminal status beats every other
# (rank 4), and customer.subscription.deleted, Stripe's last word on it, beats a terminal update (5).
# A live status is no step forward: a subscription past_due (unpaid, paused) becomes active again
# when paid, maybe in the second it fell behind. By SUBSCRIPTION_LIFE, the usual way forward; an
# event whose previous_attributes report a move back (past_due -> active) came after the event that
# put the subscription where it moved from, and ranks just above that status. Live ranks are below
# 0: rows stored by the previous scale (live 0 to 3, terminal 4) still lose to an ending. Two events
# of one rank in one second (the same status, other items) go by their items (webhooks/store.py
# GUARDS), else to the last delivered.
SUBSCRIPTION_LIFE = {"incomplete": 0, "trialing": 1, "active": 2, "past_due": 3, "unpaid": 4, "paused": 4}
SUBSCRIPTION_ENDED = frozenset({"canceled", "incomplete_expired"})
SUBSCRIPTION_ENDED_RANK, SUBSCRIPTION_DELETED_RANK = 4, 5
# The charge and the payment intent of one attempt arrive as separate events, each knowing some of
# it: keep what either said (the newer one wins where both speak).
ATTEMPT_MERGE = {
    "amount_refunded": "greatest",
    "stripe_customer_id": "coalesce",
    "invoice_id": "coalesce",
    # The charge the row's outcome codes are about (none for a failure that made no charge).
    "charge_id": "outcome_charge",
    # The outcome charge's method (charges keeps each charge's), else whichever event named one.
    "payment_method_id": "outcome_method",
    # An attempt's outcome codes belong to its charge: the next charge on the same intent, or a
    # failure that made none (3-D Secure failed), must not inherit the previous one's advice
    # (do_not_try_again) or decline code. The two events of one charge (its own and its intent's)
    # merge the same in either order, also in the same second.
    "decline_code": "per_charge",
    "failure_code": "per_charge",
    "advice_code": "per_charge",
    # One row per payment intent, and Stripe confirms an invoice's intent again for every retry
    # (its own, ours, the customer's on the hosted page): the row's time is its latest attempt's,
    # which is what "in flight", "after a card change" and "newer than our retry" compare with.
    "attempted_at": "greatest",
    # When the latest failure that made no charge was reported (a failed 3-D Secure): such a failure
    # has no charge time to go by, and attempted_at moves with later events about the intent. Set by
    # those failures' events only (NULL in every other row, which GREATEST ignores).
    "failed_at": "greatest",
    # What the newest of those failures named: the intent's latest_charge when it failed (the charges
    # made before it, so its place among a same-second tie's), and its card.
    "failed_after_charge": "chargeless_fact",
    "failed_method": "chargeless_fact",
    # Every charge made on the intent, each with its method and time: the card networks' cap
    # counts charges, and a reused intent's row alone would be one however many retries ran on it.
    "charges": "charges",
}
# The default method: the guard's, but a same-second tie goes to the event that reports its change.
CUSTOMER_MERGE = {"changed_at": "greatest", "default_payment_method_id": "default_method",
                  "prev_default_payment_method_id": "default_method"}
# charge.outcome.type of a payment the issuer never declined: Radar blocked it (outcome.reason is
# Radar's: highest_risk_level, rule, ...), Stripe never sent it (invalid), or it went through. Its
# reason is no decline code. Only issuer_declined is documented to carry one; a type Stripe does not
# document (an open enum) keeps its reason, as every code is kept.
NOT_ISSUER_OUTCOMES = frozenset({"blocked", "invalid", "authorized", "manual_review"})
# last_payment_error.code of a failure that made no charge: the customer's authentication (3-D Secure)
# failed before any charge was attempted. The intent's webhook carries no other sign of it (its
# latest_charge is an id; a charge's three_d_secure result is on the charge, which was not made).
AUTHENTICATION_FAILURES = frozenset({"payment_intent_authentication_failure"})
# Payment methods that debit a bank account: a failed debit's error names no charge, its intent's
# latest_charge is the failed one.
BANK_DEBITS = frozenset({"sepa_debit", "bacs_debit", "us_bank_account", "au_becs_debit", "acss_debit",
                         "nz_bank_account"})
PI_STATUS = {"requires_payment_method": "failed", "canceled": "failed", "succeeded": "succeeded",
             "processing": "pending", "requires_action": "requires_action", "requires_confirmation": "pending",
             "requires_capture": "pending"}


class NotAStripeEvent(ValueError):
    """The body parsed but is not a Stripe event envelope."""


class OutOfRange(ValueError):
    """A genuine event holds a value no column can take (a timestamp no date can hold, Infinity)."""


@dataclass(frozen=True)
class MirrorRow:
    table: str
    key: str
    values: dict[str, Any]
    # columns merged regardless of the ordering key, commutatively: name -> "least" | "greatest"
    merge: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Extracted:
    event_id: str
    type: str
    created: int
    customer: str | None
    trigger: Trigger | None
    rows: tuple[MirrorRow, ...]
    payment_intent: str | None = None
    invoice_id: str | None = None
    # A payment method's event: routed by the customer its row knows when the event names none (a
    # detached method's object has customer null, and its previous_attributes may be absent).
    payment_method: str | None = None


def ts(epoch: Any) -> datetime | None:
    """Epoch seconds -> UTC datetime; None when absent. Raises OutOfRange beyond what a date holds
    (milliseconds by mistake land in the year 33658)."""
    if isinstance(epoch, int | float) and not isinstance(epoch, bool) and epoch > 0:
        try:
            return datetime.fromtimestamp(epoch, tz=UTC)
        except (OverflowError, ValueError, OSError) as exc:
            raise OutOfRange(f"timestamp {epoch} is out of range") from exc
    return None


def _id(value: Any) -> str | None:
    """A Stripe reference is an id string or an expanded object with an id."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("id"), str):
        return value["id"]
    return None


# Stripe's ids are at most 255 characters; one of kilobytes is no index entry's (btree's limit is
# about 2.7 kB a row), and the database refuses it (app/db.py turns that into ValueRejected: a 422).
MAX_ROUTED_ID_BYTES = 2048


def _routed_id(value: str) -> str:
    """An id the event is routed by but no mirror row stores, refused as ingest refuses one it
    stores: the bad-debt outcome of a cancelled intent writes it into an indexed column
    (bad_debt_payment.stripe_payment_intent_id), after the ingest statement, where its refusal was a
    500 for every delivery of the event."""
    if len(value.encode("utf-8", "surrogatepass")) > MAX_ROUTED_ID_BYTES:
        raise OutOfRange(f"id too long to store ({len(value)} characters)")
    return value


def _int(value: Any, default: int = 0) -> int:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return default
    try:
        return int(value)
    except (OverflowError, ValueError) as exc:  # Infinity, NaN: Python's JSON decoder reads them
        raise OutOfRange(f"number {value} is out of range") from exc


def _obj(value: Any) -> Mapping[str, Any]:
    """A nested Stripe object; an empty one where the event holds anything else (a signed event of
    an unexpected shape is mirrored with what it has, never a 500)."""
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _line_product(line: Mapping[str, Any]) -> str | None:
    details = _obj(line.get("pricing")).get("price_details")
    if isinstance(details, Mapping) and _id(details.get("product")):
        return _id(details.get("product"))
    price = line.get("price")
    if isinstance(price, Mapping) and _id(price.get("product")):
        return _id(price.get("product"))
    return None


def invoice_subscription(invoice: Mapping[str, Any]) -> str | None:
    details = _obj(invoice.get("parent")).get("subscription_details")
    if isinstance(details, Mapping) and _id(details.get("subscription")):
        return _id(details.get("subscription"))
    return _id(invoice.get("subscription"))


def _invoice_lines(invoice: Mapping[str, Any]) -> list[dict[str, Any]]:
    return invoice_lines(_list(_obj(invoice.get("lines")).get("data")), invoice_subscription(invoice))


def lines_incomplete(invoice: Mapping[str, Any]) -> bool:
    """Whether the invoice object carries only its first lines (Stripe's list ``has_more``): the
    whole list is at GET /v1/invoices/<id>/lines (app/payments/invoice_lines.py fetches it)."""
    return _obj(invoice.get("lines")).get("has_more") is True


def invoice_lines(lines: list[Any], fallback: str | None) -> list[dict[str, Any]]:
    """The mirror's lines of Stripe line items (an event's first ones, or the whole list fetched):
    a line naming no product is its subscription's (``fallback``), else the account's."""
    out = []
    for line in lines:
        if not isinstance(line, Mapping):
            continue
        product = _line_product(line) or (f"subscription:{fallback}" if fallback else "account")
        out.append({"product": product, "amount": _int(line.get("amount")), "item": _line_item(line)})
    return out


def _line_item(line: Mapping[str, Any]) -> str | None:
    """The subscription item a line bills (entitlements tell a plan swapped in from an add-on by it)."""
    details = _obj(line.get("parent")).get("subscription_item_details")
    item = _id(details.get("subscription_item")) if isinstance(details, Mapping) else None
    return item or _id(line.get("subscription_item"))  # API versions before 2025-03-31


def _invoice_row(event_type: str, created: int, event_id: str, inv: Mapping[str, Any]) -> MirrorRow:
    status = str(inv.get("status") or "open")
    transitions = _obj(inv.get("status_transitions"))
    failed_at = ts(created) if event_type == "invoice.payment_failed" else None
    event_time = ts(created)
    values = {
        "stripe_customer_id": _id(inv.get("customer")),
        "subscription_id": invoice_subscription(inv),
        "status": status,
        "billing_reason": inv.get("billing_reason"),
        "currency": inv.get("currency") or "usd",
        "total": _int(inv.get("total")),
        "amount_due": _int(inv.get("amount_due")),
        "amount_paid": _int(inv.get("amount_paid")),
        "amount_remaining": _int(inv.get("amount_remaining")),
        # Credited after payment only: a credit note before payment already lowered what was due.
        "credited_amount": _int(inv.get("post_payment_credit_notes_amount")),
        "attempt_count": _int(inv.get("attempt_count")),
        "lines": _invoice_lines(inv),
        "lines_incomplete": lines_incomplete(inv),
        "created": ts(inv.get("created")) or event_time,
        # Stripe: null where collection_method is charge_automatically; kept null whatever a payload says.
        "due_date": None if inv.get("collection_method") == "charge_automatically" else ts(inv.get("due_date")),
        "first_failed_at": failed_at,
        "last_failed_at": failed_at,
        "paid_at": ts(transitions.get("paid_at")) or (event_time if status == "paid" else None),
        "voided_at": ts(transitions.get("voided_at")) or (event_time if status == "void" else None),
        "marked_uncollectible_at": ts(transitions.get("marked_uncollectible_at"))
        or (event_time if status == "uncollectible" else None),
        "source_created": created,
        "source_rank": INVOICE_RANK.get(status, 1),
        "source_event_id": event_id,
    }
    # A mark as uncollectible is a fact the later payment does not undo (how the debt ended reads it).
    # A finalized invoice's whole list of lines (fetched, or all in its event) is never replaced by
    # an event's first lines (webhooks/store.py "lines"). What was credited after payment only grows
    # (Stripe voids a credit note of an open invoice only): a credit note issued in the second the
    # invoice was paid ties with invoice.paid on the ordering key, and the greater is the later.
    merge = {"first_failed_at": "least", "last_failed_at": "greatest", "attempt_count": "greatest",
             "marked_uncollectible_at": "least", "lines": "lines", "lines_incomplete": "lines",
             "credited_amount": "tie_greatest"}
    return MirrorRow("stripe_invoice", str(inv["id"]), values, merge)


def _issuer_outcome(outcome: Mapping[str, Any]) -> bool:
    kind = outcome.get("type")
    return not (isinstance(kind, str) and kind in NOT_ISSUER_OUTCOMES)


def _attempt_from_charge(created: int, charge: Mapping[str, Any]) -> MirrorRow:
    status = str(charge.get("status") or "pending")
    outcome = _obj(charge.get("outcome"))
    pi = _id(charge.get("payment_intent"))
    charged_at = ts(charge.get("created")) or ts(created)
    values = {
        "stripe_customer_id": _id(charge.get("customer")),
        "invoice_id": _id(charge.get("invoice")),
        "charge_id": charge.get("id"),
        "payment_method_id": _id(charge.get("payment_method")),
        "status": status,
        "amount": _int(charge.get("amount")),
        "amount_refunded": _int(charge.get("amount_refunded")),
        # For a charge the issuer declined outcome.reason holds its decline code; for one Radar
        # blocked, Radar's reason (the intent's last_payment_error has the decline code).
        "decline_code": outcome.get("reason") if status == "failed" and _issuer_outcome(outcome) else None,
        "failure_code": charge.get("failure_code"),
        "advice_code": outcome.get("advice_code"),
        "attempted_at": charged_at,
        "failed_at": None,  # a failed charge is timed by its own time (charges)
        "failed_after_charge": None,
        "failed_method": None,
        "charges": _charges(charge.get("id"), _id(charge.get("payment_method")),
                            int(charged_at.timestamp()) if charged_at else created),
        "source_created": created,
        "source_rank": ATTEMPT_RANK.get(status, 0),
    }
    return MirrorRow("stripe_payment_attempt", pi or str(charge["id"]), values, ATTEMPT_MERGE)


def _attempt_from_intent(created: int, intent: Mapping[str, Any]) -> MirrorRow:
    status = PI_STATUS.get(str(intent.get("status")), str(intent.get("status") or "pending"))
    error = _obj(intent.get("last_payment_error"))
    method = _id(intent.get("payment_method")) or _id(error.get("payment_method"))
    # The charge the event is about, with its card. A decline's error names its own charge and card
    # (the intent may name another card by now); a failed 3-D Secure made no charge at all; a success
    # or a debit processing is the intent's latest charge, on the intent's card. An intent waiting for
    # the customer, or cancelled, still names the previous charge: it adds none.
    charge: tuple[str | None, str | None] = (None, None)
    failed = intent.get("status") == "requires_payment_method"  # a confirmation failed (not a cancellation)
    if failed:
        charge = (_failed_charge(intent, error), _id(error.get("payment_method")) or method)
    elif intent.get("status") in ("succeeded", "processing"):
        charge = (_id(intent.get("latest_charge")), method)
    # The charge the event's outcome is about: a failed payment's (none where it made no charge);
    # otherwise the intent's latest charge.
    outcome_charge = charge[0] if failed else _id(intent.get("latest_charge"))
    chargeless = failed and charge[0] is None
    values = {
        "stripe_customer_id": _id(intent.get("customer")),
        "invoice_id": _id(intent.get("invoice")),
        "charge_id": outcome_charge,
        "payment_method_id": method,
        "status": status,
        "amount": _int(intent.get("amount")),
        "amount_refunded": 0,
        "decline_code": error.get("decline_code") if status == "failed" else None,
        "failure_code": error.get("code") if status == "failed" else None,
        "advice_code": error.get("advice_code") if status == "failed" else None,
        # The event's time, not the intent's creation: a reused intent was created at its first attempt.
        "attempted_at": ts(created),
        # A failure that made no charge (or names none) is timed by the event that reported it.
        "failed_at": ts(created) if chargeless else None,
        # What such a failure names: the intent's latest charge at the time (made before it), its card.
        "failed_after_charge": _id(intent.get("latest_charge")) if chargeless else None,
        "failed_method": charge[1] if chargeless else None,
        # At the event's time: the intent does not say when the charge was made (the charge's own
        # event, when it comes, brings the earlier, exact time).
        "charges": _charges(charge[0], charge[1], created),
        "source_created": created,
        "source_rank": ATTEMPT_RANK.get(status, 0),
    }
    return MirrorRow("stripe_payment_attempt", str(intent["id"]), values, ATTEMPT_MERGE)


def _failed_charge(intent: Mapping[str, Any], error: Mapping[str, Any]) -> str | None:
    """The charge a failed payment intent's failure is about: the one its last_payment_error names;
    else the intent's latest charge where a charge was made: an issuer's decline (it has a
    decline_code), or a bank debit (SEPA, ACH), whose error names no charge; else none: the failure
    made no charge (a failed 3-D Secure, a retry refused before charging), and on a reused intent
    latest_charge still names the previous, already announced decline."""
    named = _id(error.get("charge"))
    code = error.get("code")
    if named is not None or (isinstance(code, str) and code in AUTHENTICATION_FAILURES):
        return named
    if error.get("decline_code") or _bank_debit(intent, error):
        return _id(intent.get("latest_charge"))
    return None


def _bank_debit(intent: Mapping[str, Any], error: Mapping[str, Any]) -> bool:
    """Whether the failed payment was a debit from a bank account: by its payment method's type,
    else by the only types the intent accepts."""
    kind = _obj(error.get("payment_method")).get("type")
    if isinstance(kind, str):
        return kind in BANK_DEBITS
    types = intent.get("payment_method_types")
    return isinstance(types, list) and bool(types) and all(isinstance(t, str) and t in BANK_DEBITS for t in types)


def _invoice_payment_link(created: int, payment: Mapping[str, Any]) -> MirrorRow | None:
    """invoice_payment.paid: the payment intent that paid an invoice, and so the link between them
    (since API 2025-03-31 neither the charge nor the intent names its invoice)."""
    inner = _obj(payment.get("payment"))
    pi = _id(inner.get("payment_intent"))
    invoice = _id(payment.get("invoice"))
    if not pi or not invoice:
        return None
    values: dict[str, Any] = {
        "stripe_customer_id": None,
        "invoice_id": invoice,
        "charge_id": None,
        "payment_method_id": None,
        "status": "succeeded",
        "amount": _int(payment.get("amount_paid")),
        "amount_refunded": 0,
        "decline_code": None,
        "failure_code": None,
        "advice_code": None,
        # When it was paid, not when the invoice payment was created: Stripe creates an invoice's
        # default one when it finalizes the invoice, maybe weeks before the customer pays it, and a
        # success read as that old is no payment in flight (compute's guard).
        "attempted_at": ts(_obj(payment.get("status_transitions")).get("paid_at")) or ts(created),
        "failed_at": None,
        "failed_after_charge": None,
        "failed_method": None,
        "charges": {},
        "source_created": created,
        "source_rank": ATTEMPT_RANK["succeeded"],
    }
    return MirrorRow("stripe_payment_attempt", pi, values, ATTEMPT_MERGE)


def _charges(charge_id: Any, method: str | None, at: int) -> dict[str, dict[str, Any]]:
    """The charge an event names, as the mirror keeps it: id -> method and epoch seconds."""
    if not isinstance(charge_id, str) or not charge_id:
        return {}
    return {charge_id: {"pm": method, "at": at}}


def _subscription_products(items: Any) -> list[str]:
    """The products of a subscription's items (a Stripe list object), each once, in item order."""
    products: list[str] = []
    for item in _list(_obj(items).get("data")):
        price = item.get("price") if isinstance(item, Mapping) else None
        product = _id(price.get("product")) if isinstance(price, Mapping) else None
        if product and product not in products:
            products.append(product)
    return products


def subscription_rank(event_type: str, status: str, previous: Mapping[str, Any]) -> int:
    """The place of a subscription's event among those of its second (SUBSCRIPTION_LIFE above).
    An unknown status is taken for a live one, as active."""
    if event_type == "customer.subscription.deleted":
        return SUBSCRIPTION_DELETED_RANK
    if status in SUBSCRIPTION_ENDED:
        return SUBSCRIPTION_ENDED_RANK
    life = SUBSCRIPTION_LIFE.get(status, SUBSCRIPTION_LIFE["active"])
    before = previous.get("status")
    if isinstance(before, str) and SUBSCRIPTION_LIFE.get(before, -1) > life:
        return 2 * SUBSCRIPTION_LIFE[before] - 9  # a move back: just after the status it left
    return 2 * life - 10


def _subscription_row(event_type: str, created: int, sub: Mapping[str, Any],
                      previous: Mapping[str, Any]) -> MirrorRow:
    status = str(sub.get("status") or "active")
    if event_type == "customer.subscription.deleted":
        status = "canceled"
    before = previous.get("items")
    values = {
        "stripe_customer_id": _id(sub.get("customer")),
        "status": status,
        "products": _subscription_products(sub.get("items")),
        # The products before this event's change of items (its previous_attributes.items), else
        # none: in a tie, the event that reports the other's products as its previous ones is the
        # later (webhooks/store.py GUARDS).
        "prev_products": _subscription_products(before) if isinstance(before, Mapping) else None,
        "canceled_at": ts(sub.get("canceled_at")) if status in SUBSCRIPTION_ENDED else None,
        # What the event says of its pause of payment collection at its second: pause_collection's
        # behavior, None while collection is not paused. Every event's word is kept beside the
        # others' (webhooks/store.py "observations"), so the pause an invoice was created in is known
        # whatever order the subscription's and the invoice's events come in (compute: an invoice
        # Stripe marked uncollectible because of a mark_uncollectible pause is no debt).
        "collection_paused": {str(created): _pause_behavior(sub.get("pause_collection"))},
        "source_created": created,
        "source_rank": subscription_rank(event_type, status, previous),
    }
    return MirrorRow("stripe_subscription", str(sub["id"]), values, SUBSCRIPTION_MERGE)


# The pause observations of a subscription's events are merged, not replaced (see _subscription_row).
SUBSCRIPTION_MERGE = {"collection_paused": "observations"}


def _pause_behavior(pause: Any) -> str | None:
    """pause_collection.behavior (keep_as_draft, mark_uncollectible, void: an open enum, kept as it
    is), None when collection is not paused."""
    behavior = _obj(pause).get("behavior")
    return behavior if isinstance(behavior, str) and behavior else None


# changed_at of a payment method no event has shown to change (GREATEST keeps any real date).
NOT_CHANGED = datetime(1970, 1, 1, tzinfo=UTC)
# A detached method's event may name no customer at all (its object's customer is null, and
# previous_attributes are documented for *.updated events only): the customer a row knows stays.
PAYMENT_METHOD_MERGE = {"changed_at": "greatest", "stripe_customer_id": "coalesce"}
# How far along its life on the customer a method's event is, for events of the same second: an
# update of an attached method (its object names the customer) comes after the attach, so a card
# attached and updated in one second (a new expiry) keeps the update in either order of delivery;
# an update naming no customer came before it (a method is attached once), so it never marks a card
# attached in its second as not attached; a detach ends it. Two updates in one second tie: the one
# whose previous_attributes.card hold the other's values (prev_card) changed the card after it
# (webhooks/store.py GUARDS); else the last delivered wins.
PAYMENT_METHOD_RANK = {"payment_method.attached": 0, "payment_method.detached": 2}
# The card's fields the mirror keeps, by Stripe's name: an update's previous_attributes.card names
# the ones it changed, with their values before it (webhooks/store.py GUARDS orders two updates of
# one second by them).
CARD_COLUMNS = {"brand": "card_brand", "last4": "card_last4", "exp_month": "exp_month", "exp_year": "exp_year",
                "fingerprint": "fingerprint"}


def _payment_method_row(event_type: str, created: int, pm: Mapping[str, Any],
                        previous: Mapping[str, Any]) -> MirrorRow:
    """A payment method, and when it last changed in a way that earns a retry: attached, updated by
    the card network, or updated in something but its metadata. A payment_method.updated that only
    touched metadata must not earn an immediate retry on the card just declined."""
    card = _obj(pm.get("card"))
    card_before = _obj(previous.get("card"))
    prev_card = {col: card_before[name] for name, col in CARD_COLUMNS.items() if name in card_before}
    detached = event_type == "payment_method.detached"
    changed = event_type != "payment_method.updated" or bool(set(previous) - {"metadata"})
    values = {
        "stripe_customer_id": _id(pm.get("customer")),
        "type": str(pm.get("type") or "card"),
        "attached": not detached and pm.get("customer") is not None,
        "card_brand": card.get("brand"),
        "card_last4": card.get("last4"),
        "exp_month": card.get("exp_month"),
        "exp_year": card.get("exp_year"),
        "fingerprint": card.get("fingerprint"),
        "changed_at": ts(created) if changed else NOT_CHANGED,
        # What the event changed the card from (its kept fields only), NULL where it changed none.
        "prev_card": prev_card or None,
        "source_created": created,
        "source_rank": PAYMENT_METHOD_RANK.get(event_type, 1 if pm.get("customer") is not None else -1),
    }
    return MirrorRow("stripe_payment_method", str(pm["id"]), values, PAYMENT_METHOD_MERGE)


def _customer_row(created: int, customer: Mapping[str, Any], previous: Mapping[str, Any]) -> MirrorRow:
    """The customer's default payment method, and when it changed: only an event whose
    previous_attributes name it says so. Stripe sends customer.updated for any change (metadata,
    the delinquent flag it sets after a failed invoice payment); taking each as a change of method
    would earn an immediate retry on the card that was just declined."""
    settings = _obj(customer.get("invoice_settings"))
    before = _obj(previous.get("invoice_settings"))
    changed = "default_payment_method" in before
    values = {
        "default_payment_method_id": _id(settings.get("default_payment_method")),
        "changed_at": ts(created) if changed else None,
        # The default it changed from (a change of one second naming the other's is the later).
        "prev_default_payment_method_id": _id(before.get("default_payment_method")) if changed else None,
        "source_created": created,
        "source_rank": 0,
    }
    # The latest change whatever order events arrive in (GREATEST ignores NULL).
    return MirrorRow("stripe_customer_state", str(customer["id"]), values, CUSTOMER_MERGE)


def extract(event: Mapping[str, Any]) -> Extracted:
    """Validate the envelope and extract what the mirror keeps. Raises NotAStripeEvent.

    An invoice or subscription with no customer (Stripe's objects carry customer_account beside it:
    one billed to an account names no customer) has no mirror row: nothing to file it under (its
    stripe_customer_id is NOT NULL) nor to route it by. The event is still stored, unroutable and
    visible, rather than refused on every delivery."""
    if not isinstance(event, Mapping) or event.get("object") != "event":
        raise NotAStripeEvent("body is not a Stripe event (object must be 'event')")
    event_id, event_type, created = event.get("id"), event.get("type"), event.get("created")
    if not isinstance(event_id, str) or not event_id:
        raise NotAStripeEvent("event has no id")
    if not isinstance(event_type, str) or not event_type:
        raise NotAStripeEvent("event has no type")
    if not isinstance(created, int) or isinstance(created, bool):
        raise NotAStripeEvent("event has no integer 'created'")
    data = _obj(event.get("data"))
    obj = data.get("object")
    if not isinstance(obj, Mapping):
        raise NotAStripeEvent("event has no data.object")
    kind = obj.get("object")
    trigger = trigger_for(event_type)
    if trigger is None and not isinstance(obj.get("id"), str):
        # An event this product does not act on, about an object with no id: invoice.upcoming, whose
        # invoice is a preview of one not created yet (Stripe sends it without an id). Stored and
        # acknowledged like any event not acted on, never a 400 that Stripe would redeliver for days;
        # it has nothing to mirror (an ignored event's rows are not written anyway).
        return Extracted(event_id=event_id, type=event_type, created=created, customer=_id(obj.get("customer")),
                         trigger=None, rows=())
    rows: list[MirrorRow] = []
    customer: str | None = None
    payment_intent: str | None = None
    invoice_id: str | None = None
    payment_method: str | None = None

    def need_id() -> str:
        if not isinstance(obj.get("id"), str):
            raise NotAStripeEvent(f"data.object of {event_type} has no id")
        return str(obj["id"])

    if kind == "invoice" and event_type.startswith("invoice."):
        need_id()
        row = _invoice_row(event_type, created, event_id, obj)
        customer = row.values["stripe_customer_id"]
        if customer is not None:  # else none to file it under (see above)
            rows.append(row)
            invoice_id = row.key
    elif kind == "charge":
        need_id()
        row = _attempt_from_charge(created, obj)
        rows.append(row)
        customer = row.values["stripe_customer_id"]
        payment_intent = _id(obj.get("payment_intent"))
    elif kind == "payment_intent" and event_type == "payment_intent.canceled":
        # A cancellation is no attempt (Stripe cancels a voided invoice's intent, or one paid out of
        # band): mirrored as one, failed, it was filed under the customer's open invoice (an intent
        # names no invoice) and put the account in dunning with nothing tried. Only routed: it ends a
        # bad-debt payment (app/payments/bad_debt_webhook.py) and refreshes the account's state.
        payment_intent = _routed_id(need_id())
        customer = _id(obj.get("customer"))
    elif kind == "payment_intent":
        need_id()
        row = _attempt_from_intent(created, obj)
        rows.append(row)
        customer = row.values["stripe_customer_id"]
        payment_intent = row.key
    elif kind == "dispute" and event_type.startswith("charge.dispute."):
        # A chargeback: nothing mirrored, only routed by the disputed charge's intent (its attempt
        # names the customer). It is put before an operator when it disputes a bad-debt payment's
        # charge (app/payments/bad_debt_webhook.py).
        need_id()
        disputed = _id(obj.get("payment_intent"))
        payment_intent = _routed_id(disputed) if disputed else None
    elif kind == "invoice_payment":
        link = _invoice_payment_link(created, obj)
        if link is not None:
            rows.append(link)
            payment_intent = link.key
        # Routed through its invoice (it names no customer), also when it names no payment intent to
        # link (paid by a payment record, out of band): the invoice's account is refreshed.
        invoice_id = _id(obj.get("invoice"))
    elif kind == "subscription" and event_type.startswith("customer.subscription."):
        need_id()
        row = _subscription_row(event_type, created, obj, _obj(data.get("previous_attributes")))
        customer = row.values["stripe_customer_id"]
        if customer is not None:  # else none to file it under (see above)
            rows.append(row)
    elif kind == "payment_method" and event_type.startswith("payment_method."):
        need_id()
        row = _payment_method_row(event_type, created, obj, _obj(data.get("previous_attributes")))
        rows.append(row)
        customer = row.values["stripe_customer_id"]
        payment_method = row.key
        if event_type == "payment_method.detached":
            # A detached method carries no customer any more; the previous one says whose it was.
            customer = _id(_obj(data.get("previous_attributes")).get("customer"))
            row.values["stripe_customer_id"] = customer
    elif kind == "customer" and event_type == "customer.updated":
        need_id()
        rows.append(_customer_row(created, obj, _obj(data.get("previous_attributes"))))
        customer = str(obj["id"])

    return Extracted(
        event_id=event_id,
        type=event_type,
        created=created,
        customer=customer,
        trigger=trigger,
        rows=tuple(rows),
        payment_intent=payment_intent,
        invoice_id=invoice_id,
        payment_method=payment_method,
    )
