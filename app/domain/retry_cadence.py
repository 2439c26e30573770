"""Retry cadence by failure class, with the card-network caps (DESIGN section 4).

transient and unknown failures follow their schedule (days after the first failure), permanent and
action_required ones are not retried on the same method; a new or updated payment method earns one
immediate retry that does not count against the budget; 8 attempts per invoice and 15 per payment
method in 30 days hold whatever the policy says. Pure: the decision's ``now`` is passed in.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

from app.domain.policy import Policy
from app.domain.snapshot import Attempt, Invoice, PaymentMethod, Retry, Snapshot
from app.domain.state import FailureClass, Reason, iso

WINDOW_30D = timedelta(days=30)
# After Stripe refused a retry before charging (an API key revoked, a permission missing), the
# next one waits this long: long enough not to hammer, short enough for an operator's fix to count.
REFUSED_BACKOFF = timedelta(hours=6)
# --- retries ------------------------------------------------------------------------------------


IN_FLIGHT_RETRY_STATES = ("dispatched", "charging", "sent")
# A debit from a bank account processes for days (SEPA up to 14 business days): an attempt
# still pending holds the invoice's retries that long, not only for the guard window.
PROCESSING_HORIZON = timedelta(days=21)


def attempt_in_flight(attempt: Attempt, now: datetime, guard: timedelta) -> bool:
    """A Stripe attempt without its outcome yet: processing (for days, a bank debit), or waiting
    for the customer (3-D Secure) within the guard window."""
    if attempt.status in ("pending", "processing"):
        return now - attempt.attempted_at < PROCESSING_HORIZON
    return attempt.status == "requires_action" and now - attempt.attempted_at < guard


def _method_attempts_in_window(snapshot: Snapshot, method: str | None, now: datetime,
                               guard: timedelta) -> list[datetime]:
    """When each attempt on ``method`` in the last 30 days was made, including our retries already
    sent to Stripe whose attempt the mirror does not hold yet: the cap counts charges, not webhooks."""
    if method is None:
        return []
    recorded = [at for at in _charge_times(snapshot.attempts, method) if now - WINDOW_30D < at <= now]
    latest = max(recorded, default=None)
    invoices = {i.id: i for i in snapshot.invoices}
    unrecorded = [r.created_at for r in snapshot.retries
                  if r.state in IN_FLIGHT_RETRY_STATES and now - r.created_at < guard
                  and (r.payment_method_id or _default_of(snapshot, invoices.get(r.invoice_id))[0]) == method
                  and (latest is None or r.created_at > latest)]
    return sorted(recorded + unrecorded)


def _charge_times(attempts: tuple[Attempt, ...], method: str) -> Iterator[datetime]:
    """When each charge on ``method`` was made. An intent counts each of its charges (the first
    attempt and every retry confirmed on it); an attempt whose charges the mirror never heard of
    (an older row, an intent known only through its invoice) counts once, at its own time."""
    for a in attempts:
        if not a.charges:
            if a.payment_method_id == method:
                yield a.attempted_at
            continue
        for charge in a.charges:
            if (charge.payment_method_id or a.payment_method_id) == method:
                yield charge.charged_at


def _default_of(snapshot: Snapshot, invoice: Invoice | None) -> tuple[str | None, datetime | None]:
    """(default payment method, when it was made default) of the invoice's Stripe customer: Stripe
    pays an invoice only with a method of its own customer."""
    return snapshot.default_of(invoice.stripe_customer_id if invoice is not None else None)


def _methods_of(snapshot: Snapshot, invoice: Invoice) -> list[PaymentMethod]:
    """The payment methods that can pay ``invoice``: its customer's."""
    return snapshot.methods_of(invoice.stripe_customer_id)


def _new_method_since(snapshot: Snapshot, invoice: Invoice, since: datetime,
                      failed_method: str | None) -> PaymentMethod | None:
    """A payment method of the invoice's customer attached, updated or made its default after
    ``since`` (the last failure)."""
    methods = _methods_of(snapshot, invoice)
    default_id, default_changed = _default_of(snapshot, invoice)
    changed = [pm for pm in methods if pm.attached and pm.changed_at > since]
    # Made default again, the method that just failed is no new method.
    if default_changed is not None and default_changed > since and default_id and default_id != failed_method:
        for pm in methods:
            if pm.id == default_id and pm.attached and pm not in changed:
                changed.append(pm)
    if not changed:
        return None
    # Prefer the default method, then the most recent change.
    changed.sort(key=lambda pm: (pm.id == default_id, pm.changed_at), reverse=True)
    return changed[0]


def plan_retry(
    snapshot: Snapshot,
    invoice: Invoice,
    attempts: list[Attempt],
    failure_class: FailureClass,
    last_failure: Attempt | None,
    schedule_start: datetime,
    policy: Policy,
    now: datetime,
) -> tuple[datetime | None, str | None, bool, bool, int, list[Reason]]:
    """-> (next_retry_at, payment method, free, exhausted, retries used, reasons)."""
    reasons: list[Reason] = []
    retries = [r for r in snapshot.retries if r.invoice_id == invoice.id]
    attempts_used = max(len(attempts), invoice.attempt_count)
    # Retries are ours (payment_retry rows) or Stripe's own (more attempts than the first one);
    # free retries after a payment-method change never count against the budget.
    free_retries = sum(1 for r in retries if r.free and r.charged)
    retries_used = max(sum(1 for r in retries if r.counts), attempts_used - 1 - free_retries, 0)
    guard = timedelta(minutes=policy.guard_window_minutes)
    last_attempt_at = attempts[-1].attempted_at if attempts else None

    in_flight = [
        r.created_at for r in retries
        if r.state in IN_FLIGHT_RETRY_STATES
        and now - r.created_at < guard
        and (last_attempt_at is None or last_attempt_at < r.created_at)
    ]
    # A Stripe attempt on the invoice without its outcome (a bank debit processing, a 3-D Secure
    # challenge open): another charge now could collect twice.
    in_flight += [a.attempted_at for a in attempts if attempt_in_flight(a, now, guard)]
    planned = _plan(snapshot, invoice, attempts, failure_class, last_failure, schedule_start, policy, now,
                    retries, attempts_used, retries_used)
    refused = max((r.created_at for r in retries if r.state == "refused"), default=None)
    if planned[0] is not None and refused is not None and planned[0] < refused + REFUSED_BACKOFF:
        # Stripe turned the last one down (a revoked key, say): it spent no budget, and asking again
        # at once would only be turned down again.
        reasons = [*planned[5], Reason("retry.refused_backoff", "Stripe refused the last retry unsent; "
                                       "the next one waits", {"invoice": invoice.id, "refused_at": iso(refused)})]
        planned = (refused + REFUSED_BACKOFF, *planned[1:5], reasons)
    if in_flight:
        # No retry while it runs; but whether the invoice's dunning has run out stays as planned: a
        # payment in flight must not lift bad debt (or ease anything) before any money arrives. The
        # payment-flow guard holds new bad debt over it, within its window.
        reasons.append(Reason("retry.in_flight", "a payment of the invoice is in flight; waiting for its outcome",
                              {"invoice": invoice.id, "since": iso(min(in_flight))}))
        return None, None, False, planned[3], retries_used, reasons
    return planned


def _plan(
    snapshot: Snapshot,
    invoice: Invoice,
    attempts: list[Attempt],
    failure_class: FailureClass,
    last_failure: Attempt | None,
    schedule_start: datetime,
    policy: Policy,
    now: datetime,
    retries: list[Retry],
    attempts_used: int,
    retries_used: int,
) -> tuple[datetime | None, str | None, bool, bool, int, list[Reason]]:
    """plan_retry once no payment of the invoice is in flight."""
    reasons: list[Reason] = []
    if invoice.status == "uncollectible":
        reasons.append(Reason("retry.none_uncollectible", "invoice marked uncollectible: no more retries",
                              {"invoice": invoice.id}))
        return None, None, False, True, retries_used, reasons

    if attempts_used >= policy.attempts_per_invoice:
        reasons.append(Reason("retry.cap_invoice", "per-invoice attempt cap reached",
                              {"invoice": invoice.id, "attempts": attempts_used, "cap": policy.attempts_per_invoice}))
        return None, None, False, True, retries_used, reasons

    failed_method = last_failure.payment_method_id if last_failure else None

    # A new or updated payment method after the last failure: one immediate free retry on it.
    since = last_failure.attempted_at if last_failure else schedule_start
    new_method = (_new_method_since(snapshot, invoice, since, failed_method)
                  if policy.immediate_retry_on_new_method else None)
    if new_method is not None:
        # A free retry skipped unsent (dispatched too long ago, say) was not used.
        used_free = any(r.free and r.charged and r.created_at >= new_method.changed_at for r in retries)
        if not used_free:
            due = max(new_method.changed_at, since)
            reasons.append(Reason("retry.new_method", "payment method changed after the failure: one immediate retry "
                                  "that does not count against the budget",
                                  {"invoice": invoice.id, "payment_method": new_method.id,
                                   "changed_at": iso(new_method.changed_at)}))
            # Whether the invoice's dunning has run out stays what it was: a card is no money. (An
            # invoice run out and old enough is bad debt, which a free retry must not lift:
            # compute then drops it. An upgrade's free retry holds its revert, as before.)
            run_out = False if invoice.is_upgrade else _scheduled(
                snapshot, invoice, attempts, failure_class, failed_method, schedule_start, policy, now, retries,
                retries_used, [])[3]
            free = _cap_method(snapshot, due, new_method.id, True, retries_used, reasons, policy, now, invoice)
            return (*free[:3], run_out, *free[4:])
    return _scheduled(snapshot, invoice, attempts, failure_class, failed_method, schedule_start, policy, now,
                      retries, retries_used, reasons)


def _scheduled(
    snapshot: Snapshot,
    invoice: Invoice,
    attempts: list[Attempt],
    failure_class: FailureClass,
    failed_method: str | None,
    schedule_start: datetime,
    policy: Policy,
    now: datetime,
    retries: list[Retry],
    retries_used: int,
    reasons: list[Reason],
) -> tuple[datetime | None, str | None, bool, bool, int, list[Reason]]:
    """The plan by failure class, with no payment-method change to act on."""
    default_method = _default_of(snapshot, invoice)[0] or failed_method
    if failure_class in (FailureClass.PERMANENT, FailureClass.ACTION_REQUIRED):
        reasons.append(Reason("retry.none_" + failure_class.value,
                              "no automatic retry on the same method; waiting for the customer to act",
                              {"invoice": invoice.id, "failure_class": failure_class.value,
                               "payment_method": failed_method}))
        return None, None, False, True, retries_used, reasons

    transient = failure_class == FailureClass.TRANSIENT
    schedule = policy.transient_schedule_days if transient else policy.unknown_schedule_days
    if retries_used >= len(schedule):
        reasons.append(Reason("retry.schedule_done", "every scheduled retry was used",
                              {"invoice": invoice.id, "retries_used": retries_used, "schedule_days": list(schedule)}))
        return None, None, False, True, retries_used, reasons

    due = schedule_start + timedelta(days=schedule[retries_used])
    facts = {"invoice": invoice.id, "failure_class": failure_class.value, "day": schedule[retries_used],
             "counted_from": iso(schedule_start)}
    # Each retry also waits its gap in the schedule after the invoice's last retry: a schedule that
    # fell behind (counted from a first failure long ago, a permanent one before a new card, say)
    # would otherwise fire its past retries back to back, one as soon as the last one's outcome came.
    last_charge = _last_retry_charge(attempts, retries)
    gap = timedelta(days=schedule[retries_used] - (schedule[retries_used - 1] if retries_used else 0))
    if last_charge is not None and last_charge + gap > due:
        due = last_charge + gap
        facts["after_last_charge"] = iso(last_charge)
    detail = f"{failure_class.value} failure: retry {retries_used + 1} of {len(schedule)}"
    reasons.append(Reason("retry.scheduled", detail, facts))
    return _cap_method(snapshot, due, default_method, False, retries_used, reasons, policy, now, invoice)


def _last_retry_charge(attempts: list[Attempt], retries: list[Retry]) -> datetime | None:
    """When the invoice was last charged after its first attempt (the failure its schedule counts
    from): by Stripe's record of each charge, or our retry sent whose charge is not mirrored yet."""
    times = sorted([*(t for a in attempts for t in (
        [c.charged_at for c in a.charges] if a.charges else [a.attempted_at])),
        *(r.created_at for r in retries if r.charged)])
    return times[-1] if len(times) > 1 else None


def _cap_method(
    snapshot: Snapshot,
    due: datetime,
    method: str | None,
    free: bool,
    retries_used: int,
    reasons: list[Reason],
    policy: Policy,
    now: datetime,
    invoice: Invoice,
) -> tuple[datetime | None, str | None, bool, bool, int, list[Reason]]:
    """Card network rule: at most N attempts per method in 30 days; defer until the window frees."""
    window = _method_attempts_in_window(snapshot, method, now, timedelta(minutes=policy.guard_window_minutes))
    cap = policy.attempts_per_method_30d
    if len(window) >= cap:
        frees_at = window[len(window) - cap] + WINDOW_30D
        reasons.append(Reason("retry.cap_method_30d", "payment method attempt cap for 30 days reached; retry deferred",
                              {"invoice": invoice.id, "payment_method": method, "cap": cap,
                               "deferred_to": iso(frees_at)}))
        due = max(due, frees_at)
    return due, method, free, False, retries_used, reasons
