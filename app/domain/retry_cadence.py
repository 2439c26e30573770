"""Retry cadence by failure class, with the card-network caps (DESIGN section 4).

transient and unknown failures follow their schedule (days after the first failure), permanent and
action_required ones are not retried on the same method; an invoice that never failed, or that is sent
for payment (the customer pays by invoice), is never retried; a new or updated payment method earns one
immediate retry that does not count against the budget, until it is tried on the invoice; no retry is
planned on a method the customer detached, nor on a card expired by the retry's day; 8 attempts per
invoice and 15 per payment method in 30 days hold whatever the policy says. Pure: the decision's
``now`` is passed in.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from datetime import datetime, timedelta

from app.domain.attempts import failure_time
from app.domain.policy import Policy
from app.domain.snapshot import Attempt, Invoice, PaymentMethod, Retry, Snapshot
from app.domain.state import FailureClass, Reason, Status, iso

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
    # Card networks count per card: every payment method id holding the same card (added again) counts.
    card = same_card(snapshot, method)
    recorded = [at for at in _charge_times(snapshot.attempts, card) if now - WINDOW_30D < at <= now]
    invoices = {i.id: i for i in snapshot.invoices}

    def mirrored(r: Retry) -> bool:
        # Its charge is on its own invoice's intent (or one the mirror has not linked to an invoice
        # yet): another invoice charged on the card after it says nothing of whether it is mirrored.
        # Only a charge the window counts stands for it (one timed after now by Stripe's clock does not).
        return any(_claimed_second(r) <= at <= now for at in _charge_times(
            tuple(a for a in snapshot.attempts if a.invoice_id in (r.invoice_id, None)), card))

    # Every retry that reached the card (r.charged), a declined one too: Stripe's decline marks it
    # failed at once, and the recompute that follows runs before the charge's webhook comes.
    unrecorded = [r.created_at for r in snapshot.retries
                  if r.charged and now - r.created_at < guard
                  and (r.payment_method_id or _default_of(snapshot, invoices.get(r.invoice_id))[0]) in card
                  and not mirrored(r)]
    return sorted(recorded + unrecorded)


def _claimed_second(r: Retry) -> datetime:
    """The retry's claim time to Stripe's precision: Stripe times a charge in whole seconds, so the
    charge of a retry claimed at 12:00:00.400 and made in that second is timed 12:00:00."""
    return r.created_at.replace(microsecond=0)


def same_card(snapshot: Snapshot, method: str) -> frozenset[str]:
    """``method`` and every payment method of the account holding the same card (Stripe's card
    fingerprint): a card removed and added again gets a new id, and is still the card networks' card."""
    fingerprint = next((pm.fingerprint for pm in snapshot.payment_methods if pm.id == method), None)
    if not fingerprint:
        return frozenset((method,))
    return frozenset((method, *(pm.id for pm in snapshot.payment_methods if pm.fingerprint == fingerprint)))


def _charge_times(attempts: tuple[Attempt, ...], methods: Collection[str]) -> Iterator[datetime]:
    """When each charge on one of ``methods`` was made. An intent counts each of its charges (the first
    attempt and every retry confirmed on it); an attempt whose charges the mirror never heard of
    (an older row, an intent known only through its invoice) counts once, at its own time."""
    for a in attempts:
        if not a.charges:
            if a.payment_method_id in methods:
                yield a.attempted_at
            continue
        for charge in a.charges:
            if (charge.payment_method_id or a.payment_method_id) in methods:
                yield charge.charged_at


def _default_of(snapshot: Snapshot, invoice: Invoice | None) -> tuple[str | None, datetime | None]:
    """(default payment method, when it was made default) of the invoice's Stripe customer: Stripe
    pays an invoice only with a method of its own customer."""
    return snapshot.default_of(invoice.stripe_customer_id if invoice is not None else None)


def _methods_of(snapshot: Snapshot, invoice: Invoice) -> list[PaymentMethod]:
    """The payment methods that can pay ``invoice``: its customer's."""
    return snapshot.methods_of(invoice.stripe_customer_id)


def _new_method(snapshot: Snapshot, invoice: Invoice, attempts: list[Attempt], retries: list[Retry],
                start: datetime, now: datetime,
                passed_over: frozenset[str] = frozenset()) -> tuple[PaymentMethod, datetime] | None:
    """(the payment method, when it changed) of the invoice's customer that earns the free retry: one
    attached, updated or made its default after ``start`` (the invoice's first failure, where its
    schedule starts) and not tried on the invoice since. Counted from the first failure and not from
    the last one: a retry queued on the old card may charge it (and fail) after the customer changed
    cards, and the new card must not lose its retry for that. A card expired by ``now`` (its immediate
    retry's time) earns none: Stripe would decline it. ``passed_over``: methods not to consider (a
    card whose capped retry would come after its expiry)."""
    default_id, default_changed = _default_of(snapshot, invoice)
    changed: list[tuple[PaymentMethod, datetime]] = []
    for pm in _methods_of(snapshot, invoice):
        if not pm.attached or pm.expired(now) or pm.id in passed_over:
            continue
        if _readded(snapshot, pm, start, attempts, retries):
            continue
        at = pm.changed_at
        if pm.id == default_id and default_changed is not None and default_changed > at:
            at = default_changed
        # Made default again, a method that failed on the invoice is no new method: it was tried
        # since its own change (being made default changes nothing of the card).
        if at > start and not _tried_since(pm.id, pm.changed_at, attempts, retries):
            changed.append((pm, at))
    if not changed:
        return None
    # Prefer the default method, then the most recent change.
    return max(changed, key=lambda c: (c[0].id == default_id, c[1]))


def _readded(snapshot: Snapshot, pm: PaymentMethod, start: datetime, attempts: list[Attempt],
             retries: list[Retry]) -> bool:
    """Whether ``pm`` is a card already tried on the invoice since ``start`` under another payment
    method id, with the same expiry: removed and added again, it is no new method (Stripe's decline
    stands: a lost, stolen or do_not_try_again card is never charged again at once). A reissued card
    (the same number with a new expiry, after expired_card) is an updated one, and earns its retry."""
    return any(other.id != pm.id and other.id in same_card(snapshot, pm.id)
               and (other.exp_month, other.exp_year) == (pm.exp_month, pm.exp_year)
               and _tried_since(other.id, start, attempts, retries)
               for other in snapshot.payment_methods)


def _tried_since(method: str, since: datetime, attempts: list[Attempt], retries: list[Retry]) -> bool:
    """Whether ``method`` was tried on the invoice from ``since`` on: a charge on it (Stripe's own
    retries included), an attempt on it failing, or one of our retries on it that reached Stripe
    (its outcome maybe not mirrored yet): claimed from ``since`` on, or knowing of a change of the
    card at ``since`` or later. ``since`` is Stripe's time and a claim's is beat's: on a beat host
    behind Stripe a retry claimed after the card's update (its webhook in) is timed before it, and
    the card it just charged would earn a free retry at once."""
    return (any(at >= since for at in _charge_times(tuple(attempts), (method,)))
            or any(a.failed and a.payment_method_id == method and failure_time(a) >= since for a in attempts)
            or any(r.charged and r.payment_method_id == method
                   and (r.created_at >= since
                        or (r.method_change_seen_at is not None and r.method_change_seen_at >= since))
                   for r in retries))


def _may_keep_dunning(snapshot: Snapshot, method: str, changed_at: datetime, retries: list[Retry]) -> bool:
    """Whether a method never tried may keep the invoice's dunning from running out (see _plan):
    not one added in bad debt (a card is no money, only a payment gets the account out; when its
    episode began is unknown, so was it added in it), and not one Stripe has already refused to
    charge (an attached method it will not take for the invoice: its free retry would come back
    refused every REFUSED_BACKOFF, and the dunning never end)."""
    stored = snapshot.stored
    if stored is not None and stored.status in (Status.BAD_DEBT, Status.LIFTING):
        entered = snapshot.open_episode_entered_at
        if entered is None or entered <= changed_at:
            return False
    return not any(r.free and r.state == "refused" and r.payment_method_id == method and r.created_at >= changed_at
                   for r in retries)


def _detached(snapshot: Snapshot, method: str) -> bool:
    """Whether the mirror knows ``method`` as detached. One it does not know at all (an older
    customer's, whose method events were never seen) is taken as usable."""
    return any(pm.id == method and not pm.attached for pm in snapshot.payment_methods)


def _expired(snapshot: Snapshot, method: str, at: datetime) -> bool:
    """Whether the mirror knows the card to be expired at ``at``. Stripe declines it (expired_card,
    permanent); a card the network updated comes back with its new expiry
    (payment_method.automatically_updated), and then earns its free retry."""
    return any(pm.id == method and pm.expired(at) for pm in snapshot.payment_methods)


def passed_over(snapshot: Snapshot, method: str, at: datetime) -> bool:
    """Whether a charge at ``at`` passes over ``method``: the mirror knows it detached (Stripe refuses
    it) or a card expired by then (Stripe declines it: expired_card). A default card the mirror knows
    as expired is read as a detached one: the next usable card is charged, or none. The isolated
    bad-debt payment chooses its card by it (app/payments/bad_debt.py)."""
    return _detached(snapshot, method) or _expired(snapshot, method, at)


def _expiry_end(snapshot: Snapshot, method: str) -> datetime | None:
    return next((pm.expires_at() for pm in snapshot.payment_methods if pm.id == method), None)


def plan_retry(
    snapshot: Snapshot,
    invoice: Invoice,
    attempts: list[Attempt],
    failure_class: FailureClass,
    last_failure: Attempt | None,
    schedule_start: datetime,
    policy: Policy,
    now: datetime,
    stays_run_out: bool = False,
) -> tuple[datetime | None, str | None, bool, bool, int, list[Reason]]:
    """-> (next_retry_at, payment method, free, exhausted, retries used, reasons).

    ``stays_run_out``: the invoice failed again in bad debt (compute._failed_again_in_bad_debt): its
    schedule is not reopened by that failure (no money arrived), though a card there before bad debt
    and never tried still keeps its dunning going."""
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
    # The per-invoice cap counts every charge of the invoice, whoever made it.
    charged = max(attempts_used, invoice_charges(invoice, attempts, retries, now, guard))
    # Stripe turned the last one down unsent (a revoked key, say): it spent no budget, and asking
    # again at once would only be turned down again. The wait is part of the retry's day, before a
    # card is chosen for it: a card valid at the planned day may have expired when the wait ends.
    refused = max((r.created_at for r in retries if r.state == "refused"), default=None)
    planned = _plan(snapshot, invoice, attempts, failure_class, last_failure, schedule_start, policy, now,
                    retries, charged, retries_used, stays_run_out, refused)
    if in_flight:
        # No retry while it runs; but whether the invoice's dunning has run out stays as planned: a
        # payment in flight must not lift bad debt (or ease anything) before any money arrives. The
        # payment-flow guard holds new bad debt over it, within its window.
        reasons.append(Reason("retry.in_flight", "a payment of the invoice is in flight; waiting for its outcome",
                              {"invoice": invoice.id, "since": iso(min(in_flight))}))
        return None, None, False, planned[3], retries_used, reasons
    return planned


def invoice_charges(invoice: Invoice, attempts: list[Attempt], retries: list[Retry], now: datetime | None = None,
                    guard: timedelta | None = None) -> int:
    """How many times the invoice was charged, for its hard cap. Stripe confirms the invoice's payment
    intent again for each retry, so one attempt row carries them all (each charge counts; an attempt
    with none known, a 3-D Secure failure, once), and Stripe's attempt_count counts only its own
    automatic retries, never our POST /v1/invoices/<id>/pay. Our retries that reached Stripe are
    charges too, with the failure before the first of them, while the mirror has not heard of all."""
    mirrored = sum(max(1, len(a.charges)) for a in attempts)
    latest = max((t for a in attempts for t in ([c.charged_at for c in a.charges] if a.charges else [a.attempted_at])),
                 default=None)
    charged = [r for r in retries if r.charged]
    # With ``now`` and ``guard``: ours not mirrored yet (claimed within the guard window, after the
    # invoice's latest mirrored charge) come on top of the mirrored ones, which may hold Stripe's own
    # automatic retries besides ours, as the card's window counts them.
    unmirrored = 0 if now is None or guard is None else sum(
        1 for r in charged if now - r.created_at < guard and (latest is None or _claimed_second(r) > latest))
    ours = [r.created_at for r in charged]
    failed_before = invoice.first_failed_at is not None and (not ours or invoice.first_failed_at < min(ours))
    return max(mirrored + unmirrored, len(ours) + int(failed_before))


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
    stays_run_out: bool,
    refused: datetime | None = None,
) -> tuple[datetime | None, str | None, bool, bool, int, list[Reason]]:
    """plan_retry once no payment of the invoice is in flight. ``attempts_used``: every charge of the
    invoice (invoice_charges), which the per-invoice cap counts whoever made it, free retries too.
    ``refused``: when Stripe last refused a retry of the invoice unsent (the next waits REFUSED_BACKOFF)."""
    reasons: list[Reason] = []
    if invoice.status == "uncollectible":
        reasons.append(Reason("retry.none_uncollectible", "invoice marked uncollectible: no more retries",
                              {"invoice": invoice.id}))
        return None, None, False, True, retries_used, reasons

    nothing = _nothing_to_retry(invoice, last_failure)
    if nothing is not None:
        reasons.append(nothing)
        return None, None, False, True, retries_used, reasons

    if attempts_used >= policy.attempts_per_invoice:
        reasons.append(Reason("retry.cap_invoice", "per-invoice attempt cap reached",
                              {"invoice": invoice.id, "attempts": attempts_used, "cap": policy.attempts_per_invoice}))
        return None, None, False, True, retries_used, reasons

    failed_method = last_failure.payment_method_id if last_failure else None

    # A new or updated payment method not tried since: one immediate free retry on it.
    since = last_failure.attempted_at if last_failure else schedule_start
    found = (_new_method(snapshot, invoice, attempts, retries, schedule_start, now)
             if policy.immediate_retry_on_new_method else None)
    passed_over: set[str] = set()
    while found is not None:
        new_method, changed_at = found
        # A free retry skipped unsent (dispatched too long ago, say) was not used. One charged since the
        # change was (cards changed together earn one): claimed after it, or knowing of its card's change
        # at or after it (Stripe's clock, as _tried_since reads it: on a beat host behind Stripe the free
        # retry on the second of two cards added a minute apart was timed before the first card's change).
        used_free = any(r.free and r.charged and (r.created_at >= changed_at or (
            r.method_change_seen_at is not None and r.method_change_seen_at >= changed_at)) for r in retries)
        if used_free:
            break
        due = max(changed_at, since)
        free_reasons = [*reasons, Reason("retry.new_method", "payment method changed after the failure: one "
                                         "immediate retry that does not count against the budget",
                                         {"invoice": invoice.id, "payment_method": new_method.id,
                                          "changed_at": iso(changed_at)})]
        if refused is not None and due < refused + REFUSED_BACKOFF:
            due = refused + REFUSED_BACKOFF
            free_reasons.append(_refused_backoff(invoice, refused))
        # Whether the invoice's dunning has run out stays mostly what it was: a card is no money.
        # (An invoice run out and old enough is bad debt, which a free retry must not lift:
        # compute then drops it. An upgrade's free retry holds its revert, as before.)
        run_out = False if invoice.is_upgrade else _scheduled(
            snapshot, invoice, attempts, failure_class, failed_method, schedule_start, policy, now, retries,
            retries_used, [], stays_run_out, refused)[3]
        # But a method already there at the last failure, and never tried, was the dunning's next
        # step: that failure, on another method, did not run it out. (Timed by the failure itself:
        # an attempt's own time moves with later events about its intent.)
        failed_at = failure_time(last_failure) if last_failure else None
        if run_out and failed_at is not None and changed_at < failed_at \
                and _may_keep_dunning(snapshot, new_method.id, changed_at, retries):
            run_out = False
            free_reasons.append(Reason("retry.untried_method", "a payment method changed before the last failure "
                                       "was never tried: the dunning has not run out",
                                       {"invoice": invoice.id, "payment_method": new_method.id,
                                        "changed_at": iso(changed_at), "last_failure_at": iso(failed_at),
                                        "failed_method": failed_method}))
        free = _cap_method(snapshot, due, new_method.id, True, retries_used, free_reasons, policy, now, invoice)
        if free[0] is not None and _expired(snapshot, new_method.id, max(free[0], now)):
            # The card's 15 charges in 30 days defer its retry past its expiry: Stripe would decline
            # it then, as any card expired by the day its retry is charged (see _scheduled). It earns
            # no free retry; another new method may, else the schedule goes on.
            passed_over.add(new_method.id)
            found = _new_method(snapshot, invoice, attempts, retries, schedule_start, now, frozenset(passed_over))
            continue
        return (*free[:3], run_out, *free[4:])
    return _scheduled(snapshot, invoice, attempts, failure_class, failed_method, schedule_start, policy, now,
                      retries, retries_used, reasons, stays_run_out, refused)


def _refused_backoff(invoice: Invoice, refused: datetime) -> Reason:
    return Reason("retry.refused_backoff", "Stripe refused the last retry unsent; the next one waits",
                  {"invoice": invoice.id, "refused_at": iso(refused)})


def _nothing_to_retry(invoice: Invoice, last_failure: Attempt | None) -> Reason | None:
    """Why no automatic retry is planned for an invoice whatever its schedule says, or None.

    Sent for payment (``collection_method`` ``send_invoice``; the mirror keeps a ``due_date`` for no
    other invoice, Stripe's is null where it charges automatically): the customer pays by invoice,
    so no card of theirs is charged unasked, a failure of theirs on the hosted page included.
    Never failed: Stripe's own collection has not failed, so there is nothing to retry.

    Either way nothing is left to retry: the dunning counts as run out (``exhausted``), so the levels
    follow the invoice's age (DESIGN 4: bad debt once retries are exhausted and 21 days passed). A
    retry planned there instead would have no card to charge, Stripe would refuse it, a refusal
    spends no budget, and it would come back every REFUSED_BACKOFF, the account never reaching
    bad debt."""
    facts = {"invoice": invoice.id}
    if invoice.due_date is not None:
        return Reason("retry.none_send_invoice", "the invoice is sent for payment (the customer pays by invoice): "
                      "no automatic charge; the dunning follows its age from the due date",
                      {**facts, "due_date": iso(invoice.due_date),
                       "failed": last_failure is not None or invoice.first_failed_at is not None})
    if last_failure is None and invoice.first_failed_at is None:
        return Reason("retry.none_no_failure", "no payment attempt of the invoice failed: nothing to retry",
                      facts)
    return None


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
    stays_run_out: bool = False,
    refused: datetime | None = None,
) -> tuple[datetime | None, str | None, bool, bool, int, list[Reason]]:
    """The plan by failure class, with no payment-method change to act on. ``refused``: as _plan's."""
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
    if stays_run_out:
        # Its dunning had run out and it failed again in bad debt (the customer's card declined on
        # the hosted invoice page, a Stripe Smart Retry): that failure's class and the attempt it
        # adds do not reopen the schedule. In bad debt only money gets an account out.
        reasons.append(Reason("retry.ran_out_bad_debt", "failed again in bad debt: the dunning stays run out "
                              "(no money arrived); the debt is paid through the bad-debt payment",
                              {"invoice": invoice.id, "failure_class": failure_class.value,
                               "retries_used": retries_used}))
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
    backoff: list[Reason] = []
    if refused is not None and due < refused + REFUSED_BACKOFF:
        due = refused + REFUSED_BACKOFF
        backoff.append(_refused_backoff(invoice, refused))

    default_id = _default_of(snapshot, invoice)[0]
    named = list(dict.fromkeys(m for m in (default_id, failed_method) if m is not None))
    detail = f"{failure_class.value} failure: retry {retries_used + 1} of {len(schedule)}"
    if not named:
        reasons.extend([Reason("retry.scheduled", detail, facts), *backoff])
        return _cap_method(snapshot, due, None, False, retries_used, reasons, policy, now, invoice)
    detached = [m for m in named if _detached(snapshot, m)]
    expired: list[str] = []
    not_before = due
    for method in (m for m in named if m not in detached):
        scheduled = Reason("retry.scheduled", detail,
                           {**facts, "after_expiry_of": list(expired)} if not_before > due else facts)
        planned = _cap_method(snapshot, not_before, method, False, retries_used, [*reasons, scheduled, *backoff],
                              policy, now, invoice)
        # A card expired by the time the retry is charged (its day, or the later one the card's cap
        # defers it to; not only now: nothing recomputes the plan then) is declined by Stripe, a
        # charge spent on the invoice's cap and the card's for nothing.
        if planned[0] is not None and _expired(snapshot, method, max(planned[0], now)):
            expired.append(method)
            # Until it has expired it is still the customer's card (the default, before the failed
            # one): the payment path charges no other card while the default can pay, so the next
            # card's retry waits for its expiry.
            not_before = max(not_before, _expiry_end(snapshot, method) or not_before)
            continue
        return planned
    # Stripe refuses to charge a detached method, and a refusal spends no budget: a retry planned
    # there would be refused every REFUSED_BACKOFF and the dunning never run out. Waiting for the
    # customer, as after a permanent decline: a method they add earns the free retry.
    reasons.append(Reason("retry.none_no_method", "no payment method left that can pay: no automatic "
                          "retry; waiting for the customer to add one",
                          {"invoice": invoice.id, "detached": detached,
                           **({"expired": expired} if expired else {})}))
    return None, None, False, True, retries_used, reasons


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
