"""Why a recompute runs. The trigger only ever lands in reasons and metrics: every trigger runs
the same full re-evaluation, there is no per-trigger code path."""

from __future__ import annotations

from enum import StrEnum


class Trigger(StrEnum):
    PAYMENT_FAILED = "PAYMENT_FAILED"
    MARKED_UNCOLLECTIBLE = "MARKED_UNCOLLECTIBLE"
    BAD_DEBT_PAID = "BAD_DEBT_PAID"
    DRIFT_DETECTED = "DRIFT_DETECTED"
    NINJAPANEL_BUTTON = "NINJAPANEL_BUTTON"
    STATE_REFRESH = "STATE_REFRESH"
    MANUAL = "MANUAL"  # `dunning recompute`
    REDRIVE = "REDRIVE"  # beat re-driving work that could not be queued or failed


EVENT_TRIGGERS: dict[str, Trigger] = {
    "invoice.payment_failed": Trigger.PAYMENT_FAILED,
    "charge.failed": Trigger.PAYMENT_FAILED,
    "payment_intent.payment_failed": Trigger.PAYMENT_FAILED,
    "invoice.marked_uncollectible": Trigger.MARKED_UNCOLLECTIBLE,
}

STATE_REFRESH_EVENTS = frozenset({
    "invoice.payment_succeeded",
    "invoice.paid",
    "invoice.finalized",
    "invoice.voided",
    "invoice.updated",
    "invoice_payment.paid",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    # Stripe's pause of the subscription itself (status paused: on demand, after a payment failure, or
    # a trial ended with no payment method) and its end: a paused subscription grants nothing
    # (entitlements.NOT_PROVISIONED). Not pause_collection, which Stripe reports as an update.
    "customer.subscription.paused",
    "customer.subscription.resumed",
    "charge.refunded",
    "charge.dispute.created",  # a chargeback: a bad-debt payment's is put before an operator
    "charge.succeeded",
    "payment_intent.succeeded",
    "payment_intent.canceled",  # an attempt ended with no money: what waited for its outcome goes on
    # An attempt in flight (a bank debit processing, a 3-D Secure challenge open): retries and bad
    # debt wait for its outcome, so the mirror must know of it.
    "payment_intent.processing",
    "payment_intent.requires_action",
    "charge.pending",
    "payment_method.attached",
    "payment_method.updated",
    "payment_method.automatically_updated",
    "payment_method.detached",
    "customer.updated",
})


def trigger_for(event_type: str) -> Trigger | None:
    """The trigger of a Stripe event type, or None for a type this product does not act on."""
    if event_type in EVENT_TRIGGERS:
        return EVENT_TRIGGERS[event_type]
    if event_type in STATE_REFRESH_EVENTS:
        return Trigger.STATE_REFRESH
    return None
