"""compute(snapshot, policy, now) -> Decision. Pure: no clock, no database, no network.

The decision is made per unpaid invoice, then combined:

1. each unpaid invoice gets its facts: since when unpaid, the failure class of its latest failed
   attempt, attempts used, whether automatic retries are exhausted, its next retry;
2. the first consequence rule that matches those facts (from the most severe down) gives the
   invoice its level; an upgrade is capped (it withholds the upgraded products, never bad debt),
   small balances are capped at notice;
3. the levels act on the products of their own invoice only, so an annual product already paid
   keeps full access; the account's level is the most severe one, and it is in bad debt when a
   regular (non-upgrade) invoice is suspended;
4. a payment in flight (a bad-debt payment, a retry started within the guard window, a bank debit
   processing) is never overridden with bad-debt consequences.

Every step that decides something adds a Reason naming the rule and the facts it matched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from app.domain.attempts import (
    SAME_ATTEMPT,
    attempts_by_invoice,
    bad_debt_intents,
    failure_time,
    first_failure_time,
    without_bad_debt_payments,
)
from app.domain.decline_codes import classify
from app.domain.entitlements import INACTIVE_SUBSCRIPTIONS, billed_products, entitlements, full_entitlements
from app.domain.mandates import mandates
from app.domain.policy import LevelRule, Policy
from app.domain.retry_cadence import (
    IN_FLIGHT_RETRY_STATES,
    PROCESSING_HORIZON,
    attempt_in_flight,
    invoice_charges,
    plan_retry,
)
from app.domain.snapshot import Attempt, BadDebtPayment, Invoice, Snapshot, Subscription, paused_markings
from app.domain.state import (
    DunningState,
    FailureClass,
    Level,
    MandateState,
    Reason,
    Status,
    failure_marker,
    iso,
    parse_failure_marker,
)

SETTLED_STATUSES = frozenset({"paid", "void"})


@dataclass(frozen=True)
class InvoiceAssessment:
    invoice: Invoice
    unpaid_since: datetime
    failure_class: FailureClass | None
    last_failure: Attempt | None
    attempts: int
    retries_used: int
    exhausted: bool
    next_retry_at: datetime | None
    retry_method: str | None
    retry_free: bool
    level: Level
    rule: str
    reasons: tuple[Reason, ...]
    # An upgrade whose dunning ran out: where a regular invoice would be suspended (bad debt), an
    # upgrade is reverted instead.
    revert_due: bool = False


@dataclass(frozen=True)
class Decision:
    state: DunningState
    mandates: tuple[MandateState, ...]
    bad_debt: bool
    # facts for the events emit derives (not stored as state)
    bad_debt_reason: str | None = None
    bad_debt_products: tuple[str, ...] = ()
    # The class of the failure that makes the bad debt (the suspended invoice that failed last), for
    # BadDebtEntered: the account's failure_class may be another invoice's, not in bad debt.
    bad_debt_failure_class: str | None = None
    resolution: str | None = None  # "paid" | "resolved" when nothing is unpaid any more
    # How the bad debt ended (BadDebtExited, the episode row), when the account leaves it: as
    # resolution, of the debts of the bad-debt episode only (_bad_debt_resolution).
    bad_debt_resolution: str | None = None
    lifting_since: datetime | None = None
    # The latest failure (state.last_failure_id names it): the class of that failure itself, for
    # its PaymentFailed (the account's failure_class may be another invoice's).
    last_failure_class: str | None = None
    # When the failure a stored last_failure_id from before markers carried a time (a plain attempt
    # id) names happened, read from that attempt; None otherwise (see events.derive_events).
    stored_failure_at: datetime | None = None
    # Every failure the decision saw (the latest is state.last_failure_id), oldest first: each one's
    # failure_marker and its own class. A recompute may see several new ones at once (invoices of
    # two subscriptions declined together, their webhooks coalesced): each is a PaymentFailed.
    failures: tuple[tuple[str, str], ...] = ()
    assessments: tuple[InvoiceAssessment, ...] = field(default=(), compare=False)

    @property
    def reasons(self) -> tuple[Reason, ...]:
        return self.state.reasons


def is_unpaid(invoice: Invoice, failed: bool, now: datetime) -> bool:
    """Debt: uncollectible, or open with money remaining after a failed attempt or the due date.
    An invoice sent with payment terms is no debt before its due date, whatever an early payment
    on the hosted page did."""
    if invoice.status == "uncollectible":
        return invoice.amount_remaining > 0
    if invoice.status != "open" or invoice.amount_remaining <= 0:
        return False
    if invoice.due_date is not None:
        return invoice.due_date <= now
    return failed or invoice.first_failed_at is not None


# --- consequence levels -------------------------------------------------------------------------


def _match_level(
    rules: Iterable[LevelRule],
    days: int,
    failure_class: FailureClass | None,
    exhausted: bool,
    uncollectible: bool,
    attempts: int,
    balance: int,
    currency: str,
) -> tuple[Level, LevelRule | None]:
    for rule in rules:
        if rule.min_days is not None and days < rule.min_days:
            continue
        if rule.failure_classes is not None and failure_class not in rule.failure_classes:
            continue
        if rule.retries_exhausted is not None and exhausted != rule.retries_exhausted:
            continue
        if rule.marked_uncollectible is not None and uncollectible != rule.marked_uncollectible:
            continue
        if rule.min_attempts is not None and attempts < rule.min_attempts:
            continue
        if not rule.balance_meets(balance, currency):  # in the invoice's currency's own terms (policy.py)
            continue
        return rule.level, rule
    # DESIGN 4: none is "nothing unpaid". An unpaid invoice no rule matched (a policy whose notice rule
    # waits a day, say) is at the mildest level that owes: notice, full access and the customer told.
    return Level.NOTICE, None


def _assess(
    snapshot: Snapshot,
    invoice: Invoice,
    attempts: list[Attempt],
    balance: int,
    policy: Policy,
    now: datetime,
    in_bad_debt: InBadDebt | None,
) -> InvoiceAssessment:
    failures = [a for a in attempts if a.failed]
    # The latest failure by when it happened: an attempt row's own time moves with any later event
    # about its intent (a cancellation), which must not make an older decline the latest, nor pick
    # between two failures of the same moment (then the greater id, as for the account's latest).
    last_failure = max(failures, key=_failure_order) if failures else None
    first_failure = _first_failure(invoice, failures)
    unpaid_since = _unpaid_since(invoice, first_failure, now)
    failure_class: FailureClass | None
    if last_failure is not None:
        failure_class = classify(last_failure.decline_code, last_failure.failure_code, last_failure.advice_code)
    elif invoice.first_failed_at is not None and any(a.status == "requires_action" for a in attempts):
        # Failed for want of the customer's authentication (3-D Secure): Stripe may send no failed
        # charge at all, only the intent waiting for its customer. No automatic retry can pass it.
        failure_class = FailureClass.ACTION_REQUIRED
    else:
        # invoice.payment_failed arrived before the attempt's detail: unknown until it does.
        failure_class = FailureClass.UNKNOWN if invoice.first_failed_at is not None else None

    # Every attempt to charge the invoice, for a rule's min_attempts: our retries confirm its payment
    # intent again (one attempt row, a charge each) and Stripe's attempt_count counts only its own.
    own_retries = [r for r in snapshot.retries if r.invoice_id == invoice.id]
    attempts_used = max(len(attempts), invoice.attempt_count, invoice_charges(invoice, attempts, own_retries))
    days = max(0, (now - unpaid_since).days)
    uncollectible = invoice.status == "uncollectible"
    # The retry schedule counts days from the first failure. An invoice with none (overdue, sent for
    # payment) gets no retry at all: retry_cadence._nothing_to_retry.
    next_retry, method, free, exhausted, retries_used, reasons = plan_retry(
        snapshot, invoice, attempts, failure_class or FailureClass.UNKNOWN, last_failure,
        first_failure or unpaid_since, policy, now,
        stays_run_out=_failed_again_in_bad_debt(in_bad_debt, invoice, failures, policy, days, failure_class,
                                                attempts_used, balance),
    )
    level, rule = _match_level(policy.rules, days, failure_class, exhausted, uncollectible, attempts_used, balance,
                               invoice.currency)
    rule_facts: dict[str, Any] = {
        "invoice": invoice.id,
        "unpaid_since": iso(unpaid_since),
        "failure_class": failure_class.value if failure_class else None,
        "retries_exhausted": exhausted,
        "marked_uncollectible": uncollectible,
    }
    # The facts a custom rule's other conditions matched on (the default policy's rules read neither).
    if rule is not None and rule.min_attempts is not None:
        rule_facts["attempts"] = attempts_used
    if rule is not None and rule.min_balance is not None:
        rule_facts.update(balance=balance, currency=invoice.currency)
    rule_name = "level." + level.value
    reasons.append(Reason(rule_name, f"invoice matched the {level.value} rule" if rule else
                          "no rule matched: an unpaid invoice is at least at notice (the customer is told)",
                          {**rule_facts, "rule": rule.describe() if rule else {}}))
    if invoice.lines_incomplete:
        # Stripe's event carried the invoice's first lines only; until beat has fetched the rest, the
        # products on them get no consequences (support sees why one is not restricted yet).
        reasons.append(Reason("lines.incomplete", "the invoice's lines are not all known yet (its event carried "
                              "the first ones): products on the others get no consequences until they are "
                              "fetched from Stripe", {"invoice": invoice.id, "products_known": list(invoice.products)}))

    revert_due = invoice.is_upgrade and level == Level.SUSPENDED
    if invoice.is_upgrade and level.rank > policy.upgrade_max_level.rank:
        reasons.append(Reason("upgrade.capped", "an unpaid upgrade withholds the upgraded products only and never "
                              "becomes bad debt", {"invoice": invoice.id, "capped_to": policy.upgrade_max_level.value,
                                                   "would_be": level.value}))
        level = policy.upgrade_max_level
    # In the invoice's currency's own terms: 500 minor units are $5.00 but 5.00 rupiah (policy.py).
    threshold = policy.small_balance_threshold_in(invoice.currency)
    if not invoice.is_upgrade and balance < threshold and level.rank > Level.NOTICE.rank:
        reasons.append(Reason("balance.small", "balance below the small-balance threshold: capped at notice",
                              {"invoice": invoice.id, "balance": balance, "currency": invoice.currency,
                               "threshold": threshold, "would_be": level.value}))
        level = Level.NOTICE
    if level == Level.SUSPENDED and free and not invoice.is_upgrade:
        # Its dunning has run out (a new card does not change that): bad debt, which is paid through
        # the bad-debt payment only. A free retry would be the regular collection path in bad debt.
        # (Below bad debt, a small balance say, the new card earns its free retry.)
        reasons.append(Reason("retry.none_bad_debt", "in bad debt: a new payment method starts no automatic "
                              "retry; the debt is paid through the bad-debt payment",
                              {"invoice": invoice.id, "payment_method": method}))
        next_retry, method, free = None, None, False

    return InvoiceAssessment(
        invoice=invoice,
        unpaid_since=unpaid_since,
        failure_class=failure_class,
        last_failure=last_failure,
        attempts=attempts_used,
        retries_used=retries_used,
        exhausted=exhausted,
        next_retry_at=next_retry,
        retry_method=method,
        retry_free=free,
        level=level,
        rule=rule_name,
        reasons=tuple(reasons),
        revert_due=revert_due,
    )


def _first_failure(invoice: Invoice, failures: list[Attempt]) -> datetime | None:
    """The invoice's first failure, where its retry schedule and its days unpaid count from: the earliest
    of what Stripe's invoice.payment_failed said and its first failed attempt's time, unless a failed
    attempt's first charge is earlier by more than the moments of one attempt (SAME_ATTEMPT): then that
    charge. An attempt row's own time moves with each later event about its intent, which Stripe
    confirms again for each retry: while the first invoice.payment_failed is not mirrored (webhooks
    come late, in no set order), it read as the latest retry. Within SAME_ATTEMPT the events'
    seconds apart decide as before, so the decisions stored stay as they are (no drift on deploy)."""
    said = min((t for t in (invoice.first_failed_at, failures[0].attempted_at if failures else None)
                if t is not None), default=None)
    charged = min((first_failure_time(f, invoice) for f in failures), default=None)
    if charged is not None and (said is None or charged < said - SAME_ATTEMPT):
        return charged
    return said


@dataclass(frozen=True)
class InBadDebt:
    """The account is in bad debt, for _failed_again_in_bad_debt: since ``began`` in Stripe's time
    (None: its start is unknown, an episode row missing)."""

    began: datetime | None


def _stored_bad_debt(snapshot: Snapshot, paused: frozenset[str] = frozenset()) -> InBadDebt | None:
    """The bad debt the last decision (the stored one) holds, dated as _bad_debt_began says."""
    stored = snapshot.stored
    if stored is None or stored.status not in (Status.BAD_DEBT, Status.LIFTING):
        return None
    entered = snapshot.open_episode_entered_at
    return InBadDebt(_bad_debt_began(snapshot, entered, paused) if entered is not None else None)


def _bad_debt_began(snapshot: Snapshot, at: datetime, paused: frozenset[str] = frozenset()) -> datetime:
    """When, in Stripe's time, the bad debt the account is in at ``at`` began, as far as its invoices'
    markings tell: the earliest marked_uncollectible_at of a regular invoice uncollectible from then
    on to ``at`` (one marked while another still was extends it back), else ``at``.

    ``at`` is the episode's row (entered_at: when a recompute first put the account in bad debt) or,
    for the recompute entering bad debt, its own moment. Stripe redelivers an event for days when our
    endpoint was down: invoice.marked_uncollectible delivered late opens the row late, while the
    invoice was uncollectible in Stripe since its marking. A failure after the marking is one in bad
    debt whatever the delivery. A marking settled before ``at`` (paid or voided since, in Stripe's
    time) no longer held the bad debt then. A bad debt of the retries-exhausted rule keeps its row's
    time: when the rule matched is not a fact Stripe dates. A marking made by a mark_uncollectible
    pause of the subscription's collection (``paused``: snapshot.paused_markings) is no debt."""
    began = at
    marked = sorted(((i.marked_uncollectible_at, i) for i in snapshot.invoices
                     if i.marked_uncollectible_at is not None and not i.is_upgrade and i.id not in paused),
                    key=lambda m: m[0], reverse=True)
    for marked_at, inv in marked:
        if marked_at >= began:
            continue
        if inv.status == "uncollectible" and inv.amount_remaining > 0:
            began = marked_at
        elif inv.status in SETTLED_STATUSES:
            settled = inv.paid_at or inv.voided_at
            if settled is not None and settled >= began:
                began = marked_at
    return began


def _failed_again_in_bad_debt(in_bad_debt: InBadDebt | None, invoice: Invoice, failures: list[Attempt],
                              policy: Policy, days: int, failure_class: FailureClass | None, attempts_used: int,
                              balance: int) -> bool:
    """Whether the invoice's dunning stays run out because it failed again in bad debt (plan_retry's
    ``stays_run_out``): the account is in bad debt (stored, or this decision enters it: _compute_full),
    the invoice failed since the bad debt began in Stripe's time (_bad_debt_began; any failure, when
    its start is unknown), and it is old enough for the bad-debt rule were its dunning run out.

    A failure in bad debt (the customer's card declined on the hosted invoice page, a Stripe Smart
    Retry) changes the invoice's latest failure class and attempt count, which would reopen its
    schedule (a permanent decline, then a transient one: 1 of 6 retries used) and take the account
    out of bad debt with no money, to enter it again later with a second episode and cancellation.
    Read from the stored state and the open episode, not replayed from the attempts: Stripe
    confirms an invoice's payment intent again for each try, so the mirror keeps only its latest
    decline. The drift sweep's snapshot carries both. Only a failure counts: the invoice's facts
    from before the episode already decided, and a card changed before it and never tried still
    keeps the dunning going (retry_cadence's untried-method rule). An upgrade never makes bad debt.
    An invoice too young for the bad-debt rule keeps its schedule."""
    if invoice.is_upgrade or not failures or in_bad_debt is None:
        return False
    began = in_bad_debt.began
    if began is not None and not any(failure_time(f) >= began for f in failures):
        return False
    level, _ = _match_level(policy.rules, days, failure_class, True, invoice.status == "uncollectible",
                            attempts_used, balance, invoice.currency)
    return level == Level.SUSPENDED


def _unpaid_since(invoice: Invoice, first_failure: datetime | None, now: datetime) -> datetime:
    """When the invoice became debt. With payment terms, open: its due date (a first attempt that fails
    long after it must not restart the clock of a debt already overdue, nor one that failed before it,
    paying early, start the clock early). Marked uncollectible: the earliest of its due date (once
    passed), its first failure (without payment terms) and its marking, which no later moment
    moves. Else its first failure."""
    due = invoice.due_date if invoice.due_date is not None and invoice.due_date <= now else None
    if invoice.status == "uncollectible":
        # With payment terms, an early failure never counts (as while it was open).
        failed = first_failure if invoice.due_date is None else None
        return min((t for t in (due, failed, invoice.marked_uncollectible_at) if t is not None),
                   default=invoice.created)
    return due or first_failure or invoice.created


# --- the decision -------------------------------------------------------------------------------


def _in_flight_payment(snapshot: Snapshot) -> BadDebtPayment | None:
    pending = [p for p in snapshot.bad_debt_payments if p.state == "pending"]
    return min(pending, key=lambda p: p.created_at) if pending else None


def _covered_elsewhere(snapshot: Snapshot) -> dict[str, BadDebtPayment]:
    """{invoice id: the other account's bad-debt payment in flight that pays it}."""
    return {invoice: p for p in sorted(snapshot.payments_elsewhere, key=lambda p: p.id, reverse=True)
            if p.state == "pending" for invoice in p.invoice_ids}


def _latest_bad_debt_failure(snapshot: Snapshot, debt: frozenset[str]) -> BadDebtPayment | None:
    """The latest ended bad-debt payment of this debt, if it failed: one that quoted an invoice still
    unpaid (``debt``). A payment that failed in an earlier bad debt, ended since without it (its
    invoices voided), says nothing of a new one the customer never tried to pay. A payment that
    names no invoices (none quoted) is taken as this debt's."""
    done = [p for p in snapshot.bad_debt_payments if p.state in ("failed", "succeeded")
            and (not p.invoice_ids or not debt.isdisjoint(p.invoice_ids))]
    if not done:
        return None
    latest = max(done, key=lambda p: (p.updated_at, p.id))
    return latest if latest.state == "failed" else None


def _recent_attempt_in_flight(snapshot: Snapshot, policy: Policy, now: datetime,
                              unpaid_attempts: Iterable[Attempt], grouped: dict[str | None, list[Attempt]]
                              ) -> tuple[datetime, datetime] | None:
    """(start, end of the hold) of the payments in flight, if any: an attempt within the guard window
    that has no outcome yet, or that succeeded on an invoice still unpaid in the mirror: Stripe sends
    the charge's success and the invoice's ``invoice.paid`` as separate events in no set order, so for
    a moment the money is collected and the invoice still says open. Bad debt applied in that moment
    would cancel a customer who paid.

    A debit from a bank account on an unpaid invoice (ACH, SEPA: ``pending``/``processing``) is in
    flight for days, until its outcome or retry_cadence's PROCESSING_HORIZON, as it holds the
    invoice's retries: cancelled on day 21 while it processed, a customer whose debit then succeeds
    would have paid for a subscription already gone.

    Our retry sent is in flight until an outcome of an attempt on its own invoice (``grouped``:
    attempts_by_invoice) comes after it: another invoice's attempt failing meanwhile is no outcome
    of it."""
    guard = timedelta(minutes=policy.guard_window_minutes)
    starts = [a.attempted_at for a in snapshot.attempts
              if a.status in ("pending", "processing", "requires_action") and now - a.attempted_at < guard]
    starts += [a.attempted_at for a in unpaid_attempts if a.status == "succeeded" and now - a.attempted_at < guard]
    starts += [r.created_at for r in snapshot.retries
               if r.state in IN_FLIGHT_RETRY_STATES and now - r.created_at < guard
               and not any(a.status in ("failed", "succeeded") and a.attempted_at >= r.created_at
                           for a in grouped.get(r.invoice_id, ()))]
    debits = [a.attempted_at for a in unpaid_attempts
              if a.status in ("pending", "processing") and now - a.attempted_at < PROCESSING_HORIZON]
    if not starts and not debits:
        return None
    ends = [t + guard for t in starts] + [t + PROCESSING_HORIZON for t in debits]
    return min(starts + debits), max(ends)


def _resolution(snapshot: Snapshot, grouped: dict[str | None, list[Attempt]],
                since: datetime | None = None, debts: frozenset[str] | None = None) -> str:
    """How the last unpaid invoices were settled: customer money ("paid") or otherwise.

    "paid" only when the customer's money paid every debt settled in the episode (each labelled
    Paid in the billing history): one of them voided, credited or written off is a debt closed
    without the customer paying in full, "resolved", whichever was settled first (a newer invoice
    paid by card while the bad debt's own invoice was then voided is no paid bad debt).

    The episode: since the stored unpaid_since (dunning), or since ``since`` when later, and after
    the debts settled before the dunning began (stored prior_settled_at): a failure learned late
    dates unpaid_since back over an earlier dunning's void, which that dunning's DunningResolved
    already said. ``debts`` (by default those the last decision found unpaid) count whenever they
    were settled."""
    stored = snapshot.stored
    if debts is None:
        debts = _last_debts(stored)
    unpaid_since = stored.unpaid_since if stored is not None else None
    since = max((t for t in (since, unpaid_since) if t is not None), default=None)
    after = stored.prior_settled_at if stored is not None else None
    # The invoices that were debt (failed, overdue or marked uncollectible) and are settled since:
    # an unrelated invoice paid on time meanwhile says nothing of how the debt ended.
    paused = paused_markings(snapshot, lambda: without_bad_debt_payments(grouped, snapshot))
    settled = [i for i in snapshot.invoices if i.status in SETTLED_STATUSES and _was_debt(i, paused)
               and (i.id in debts or ((since is None or _settled_at(i) >= since)
                                      and (after is None or _settled_at(i) > after)))]
    from app.domain.billing_history import Label, label

    if settled and all(label(i, grouped.get(i.id, ())) == Label.PAID for i in settled):
        return "paid"
    return "resolved"


def _settled_at(invoice: Invoice) -> datetime:
    return invoice.paid_at or invoice.voided_at or invoice.created


def _last_debts(stored: DunningState | None) -> frozenset[str]:
    """The invoices the last decision (the stored one) found unpaid: its level reasons name them."""
    return frozenset(str(r.facts["invoice"]) for r in (stored.reasons if stored is not None else ())
                     if r.rule.startswith("level.") and r.facts.get("invoice"))


def _prior_settled_at(snapshot: Snapshot, status: Status) -> datetime | None:
    """DunningState.prior_settled_at: while current, the latest settlement of the debts settled by
    then; kept from the last decision in current (the stored one) when the account enters dunning,
    and while it stays in dunning. Not the snapshot's on entry: a debt that failed and was settled
    unseen, in the recompute that also sees the new failure, is this dunning's (no decision said it
    ended), not an earlier one's."""
    stored = snapshot.stored
    if status == Status.CURRENT:
        return _latest_settled_debt(snapshot)
    return stored.prior_settled_at if stored is not None else None


def _latest_settled_debt(snapshot: Snapshot) -> datetime | None:
    paused = paused_markings(snapshot, lambda: without_bad_debt_payments(attempts_by_invoice(snapshot), snapshot))
    return max((_settled_at(i) for i in snapshot.invoices if i.status in SETTLED_STATUSES and _was_debt(i, paused)),
               default=None)


def _bad_debt_resolution(snapshot: Snapshot, grouped: dict[str | None, list[Attempt]]) -> str:
    """_resolution of the bad-debt episode's debts: those settled since it began, and those the
    last decision in bad debt (the stored one) found unpaid, whenever settled (paid just before
    the episode's row was written, its webhook late). A debt of the dunning before it, settled
    before (voided while another invoice went on to bad debt that the customer then paid), is no
    part of how the bad debt ended: DunningResolved says it, BadDebtExited does not."""
    return _resolution(snapshot, grouped, since=snapshot.open_episode_entered_at)


def _leaves_bad_debt(snapshot: Snapshot, status: Status) -> bool:
    stored = snapshot.stored
    return (stored is not None and stored.status in (Status.BAD_DEBT, Status.LIFTING)
            and status not in (Status.BAD_DEBT, Status.LIFTING))


def _was_debt(invoice: Invoice, paused: frozenset[str] = frozenset()) -> bool:
    """Whether the invoice was debt before it was settled, as is_unpaid decides: marked uncollectible
    (not by a mark_uncollectible pause of its subscription's collection: ``paused``), else with
    payment terms overdue (an early failure on the hosted page is none), else failed."""
    if invoice.marked_uncollectible_at is not None and invoice.id not in paused:
        return True
    if invoice.due_date is not None:
        settled_at = invoice.paid_at or invoice.voided_at
        return settled_at is None or invoice.due_date < settled_at
    return invoice.first_failed_at is not None


def _may_be_unpaid(invoice: Invoice) -> bool:
    """False when is_unpaid is False whatever the attempts and the clock (see is_unpaid)."""
    return invoice.amount_remaining > 0 and invoice.status in ("open", "uncollectible")


def compute(snapshot: Snapshot, policy: Policy, now: datetime) -> Decision:
    for invoice in snapshot.invoices:
        if _may_be_unpaid(invoice):
            return _compute_full(snapshot, policy, now)
    # Most accounts, most of the time: nothing that can be unpaid. The drift sweep computes every
    # account, so this case skips the per-invoice machinery; tests/unit/test_compute_fast_path.py
    # checks with generated snapshots that it decides exactly what _compute_full decides.
    return _nothing_unpaid(snapshot, policy, now)


def _nothing_unpaid(snapshot: Snapshot, policy: Policy, now: datetime) -> Decision:
    """_compute_full with no unpaid invoice: no assessment, so no level, retry, guard or action."""
    subscriptions = snapshot.subscriptions
    # Here the state depends only on the policy version, the subscriptions' status and products, and
    # the products only the invoices show (billed_products).
    key: Any = (policy.version, *[(s.status, s.products) for s in subscriptions]) if subscriptions else policy.version
    if not snapshot.invoices and not snapshot.payment_methods:
        decision = _PLAIN_DECISIONS.get(key)
        if decision is None:
            decision = _remember(_PLAIN_DECISIONS, key, Decision(
                state=_plain_state(key, subscriptions, policy), mandates=(), bad_debt=False, resolution="resolved",
                lifting_since=None, assessments=()))
        kept = _announced_kept(snapshot, ())
        return replace(decision, state=replace(decision.state, announced_failures=kept)) if kept else decision
    billed = billed_products(subscriptions, snapshot.invoices)
    if billed:
        key = (key, "billed", billed)
    settled = any(i.status in SETTLED_STATUSES for i in snapshot.invoices)
    state = _plain_state(key, subscriptions, policy, billed)
    if snapshot.payment_methods:
        # With nothing unpaid, a card's expiry is the only moment time alone changes the decision
        # (its mandate turns expired): the earliest one is the review.
        last = _last_valid_month(snapshot, now)
        if last is not None:
            state = _reviewed_state(state, key, last)
    prior = _latest_settled_debt(snapshot) if settled else None
    if prior is not None:
        state = replace(state, prior_settled_at=prior)
    kept = _announced_kept(snapshot, ())
    return Decision(
        state=replace(state, announced_failures=kept) if kept else state,
        mandates=mandates(snapshot, now) if snapshot.payment_methods else (),
        bad_debt=False,
        resolution=_resolution(snapshot, attempts_by_invoice(snapshot)) if settled else "resolved",
        bad_debt_resolution=(_bad_debt_resolution(snapshot, attempts_by_invoice(snapshot))
                             if settled and _leaves_bad_debt(snapshot, Status.CURRENT) else None),
        lifting_since=None,
        assessments=(),
    )


# The drift sweep computes every account, and most have nothing unpaid: their state (and, with no
# invoice and no payment method, their whole decision) is the same for every account with the same
# key, so it is made once and shared. Decision and DunningState are immutable and nothing mutates
# their dicts (the sweep's stored states are shared the same way). Bounded: cleared when full, so
# memory stays flat; tests/unit/test_compute_fast_path.py checks the shared decisions too.
_PLAIN_STATES: dict[Any, DunningState] = {}
_PLAIN_DECISIONS: dict[Any, Decision] = {}
_REVIEWED_STATES: dict[Any, DunningState] = {}  # (key, a card's expiry month): _reviewed_state
PLAIN_CACHE_SIZE = 1024


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> Any:
    if len(cache) >= PLAIN_CACHE_SIZE:
        cache.clear()
    cache[key] = value
    return value


def _reviewed_state(state: DunningState, key: Any, card: tuple[int, int]) -> DunningState:
    """The plain state of ``key`` reviewed when a card of ``card`` (exp_year, exp_month) expires,
    shared like the plain states: cards expire at the start of a few months, so most accounts with a
    card share one (and the drift sweep compares each distinct pair of states once per page)."""
    shared = _REVIEWED_STATES.get((key, card))
    if shared is not None:
        return shared
    review = _month_after(card)
    return _remember(_REVIEWED_STATES, (key, card),
                     state if review is None else replace(state, next_review_at=review))


def _plain_state(key: Any, subscriptions: tuple[Subscription, ...], policy: Policy,
                 billed: tuple[str, ...] = ()) -> DunningState:
    state = _PLAIN_STATES.get(key)
    if state is not None:
        return state
    return _remember(_PLAIN_STATES, key, DunningState(
        status=_CURRENT,
        level=_NONE,
        failure_class=None,
        next_retry_at=None,
        retry_invoice_id=None,
        retry_payment_method_id=None,
        retry_free=False,
        retries_used=0,
        outstanding_amount=0,
        unpaid_since=None,
        last_failure_id=None,
        reasons=(Reason("status.current", "nothing unpaid", {}),),
        entitlements=full_entitlements(subscriptions, billed),
        actions_requested=(),
        policy_version=policy.version,
    ))


_CURRENT = Status.CURRENT.value
_NONE = Level.NONE.value


def _compute_full(snapshot: Snapshot, policy: Policy, now: datetime) -> Decision:
    grouped = attempts_by_invoice(snapshot)
    own = without_bad_debt_payments(grouped, snapshot)
    # Invoices Stripe marked uncollectible because the merchant paused their subscription's collection
    # with mark_uncollectible (service given for free, never attempted): no debt, no consequence.
    paused = paused_markings(snapshot, lambda: own)
    forgiven = [inv for inv in sorted(snapshot.invoices, key=lambda i: (i.created, i.id))
                if inv.id in paused and inv.status == "uncollectible" and inv.amount_remaining > 0]
    unpaid = [
        inv for inv in sorted(snapshot.invoices, key=lambda i: (i.created, i.id))
        if inv.id not in paused and is_unpaid(inv, any(a.failed for a in own.get(inv.id, ())), now)
    ]
    balances = _balances(unpaid)
    unpaid_attempts = [a for inv in unpaid for a in own.get(inv.id, ())]
    stored_bad_debt = _stored_bad_debt(snapshot, paused)
    assessed = [_assess(snapshot, inv, own.get(inv.id, []), balances.get(inv.currency, 0), policy, now,
                        stored_bad_debt) for inv in unpaid]
    level, suspended, status = _standing(assessed)
    if stored_bad_debt is None and status == Status.BAD_DEBT:
        # Entering bad debt, with a marking learned late (Stripe's time before ``now``): a failure since
        # the marking is one in bad debt already, as the next recompute (the episode's row open) reads
        # it. Deciding it here too keeps the recompute after this one a no-op.
        began = _bad_debt_began(snapshot, now, paused)
        if began < now:
            entering = [_assess(snapshot, inv, own.get(inv.id, []), balances.get(inv.currency, 0), policy, now,
                                InBadDebt(began)) for inv in unpaid]
            # A policy whose rules read a run-out dunning otherwise could leave bad debt this way.
            if _standing(entering)[2] == Status.BAD_DEBT:
                assessed = entering
                level, suspended, status = _standing(assessed)
    reasons: list[Reason] = []
    for a in assessed:
        reasons.extend(a.reasons)
    for inv in forgiven:
        reasons.append(Reason("invoice.collection_paused", "marked uncollectible by Stripe while its subscription's "
                              "payment collection was paused (mark_uncollectible), never attempted: forgiven by "
                              "the merchant, no debt", {"invoice": inv.id, "subscription": inv.subscription_id}))

    # Payment-flow guard: never put bad-debt consequences over a payment in flight.
    held_until: datetime | None = None  # when a guard's hold ends, if one holds
    covered = _covered_elsewhere(snapshot)
    held_elsewhere = {a.invoice.id: _held_level(a, balances.get(a.invoice.currency, 0), policy, now)
                      for a in assessed if a.level == Level.SUSPENDED and a.invoice.id in covered}
    if held_elsewhere:
        # Another account's bad-debt payment in flight pays these invoices (another team moved their
        # customer here while it ran, a bank debit for days): they are held below bad debt until its
        # outcome, which recomputes the invoices' owners (settlement, the failure's webhook or
        # reconciliation). No lifting: this account made no payment, and has no bad debt to lift.
        reasons.append(Reason("guard.payment_elsewhere", "a bad-debt payment of another account, made before "
                              "the customer moved here, is in flight for these invoices: bad-debt consequences "
                              "held until its outcome",
                              {"payments": sorted({covered[i].id for i in held_elsewhere}),
                               "held_levels": {invoice: lv.value for invoice, lv in held_elsewhere.items()}}))
        assessed = _held_at(assessed, held_elsewhere)
        level, suspended, status = _standing(assessed)
    in_flight = _in_flight_payment(snapshot)
    lifting_since = None
    if in_flight is not None and status == Status.BAD_DEBT:
        status = Status.LIFTING
        lifting_since = in_flight.created_at
        reasons.append(Reason("guard.lifting", "a bad-debt payment is in flight: bad debt is being lifted",
                              {"payment": in_flight.id, "since": iso(in_flight.created_at)}))
    elif status == Status.BAD_DEBT:
        stored = snapshot.stored
        hold = _recent_attempt_in_flight(snapshot, policy, now, unpaid_attempts, own)
        # It holds entering bad debt only: an account already in bad debt (or lifting it, its
        # bad-debt payment just failed) stays there, its cancellation kept, whatever else is paying.
        if hold is not None and (stored is None or stored.status not in (Status.BAD_DEBT, Status.LIFTING)):
            started, held_until = hold
            held = {a.invoice.id: _held_level(a, balances.get(a.invoice.currency, 0), policy, now)
                    for a in assessed if a.level == Level.SUSPENDED}
            reasons.append(Reason("guard.payment_in_flight", "a payment is in flight (started within the guard "
                                  "window, or a bank debit processing): bad-debt consequences held until its outcome",
                                  {"since": iso(started), "until": iso(held_until),
                                   "window_minutes": policy.guard_window_minutes,
                                   "held_levels": {invoice: lv.value for invoice, lv in held.items()}}))
            assessed = _held_at(assessed, held)
            level, suspended, status = _standing(assessed)  # every held level is below suspended
    failed_payment = _latest_bad_debt_failure(snapshot, frozenset(a.invoice.id for a in assessed))
    if failed_payment is not None and status == Status.BAD_DEBT:
        reasons.append(Reason("bad_debt.payment_failed", "the bad-debt payment failed; the account stays in bad debt",
                              {"payment": failed_payment.id, "failure": failed_payment.failure_reason}))

    if not assessed:
        reasons.append(Reason("status.current", "nothing unpaid", {}))

    # Requests to the subscription-lifecycle workflow, present while they are needed.
    active_subs = {s.id for s in snapshot.subscriptions if s.status not in INACTIVE_SUBSCRIPTIONS}
    known_subs = {s.id for s in snapshot.subscriptions}
    actions: set[str] = set()
    if status == Status.BAD_DEBT:
        for a in suspended:
            sub = a.invoice.subscription_id
            if sub and (sub in active_subs or sub not in known_subs):
                actions.add(f"cancel:{sub}")
    # An upgrade is reverted when its dunning has run out by the same rules that make a regular
    # invoice bad debt (retries exhausted and old enough, or marked uncollectible), not as soon as
    # no retry is planned: a permanent or action_required decline (3-D Secure) plans none on day 0,
    # and the customer is being asked to act. A payment in flight holds it, as it holds bad debt.
    # Not the upgrade of a subscription that has ended (canceled meanwhile by the customer): there is
    # nothing left to revert, as there is nothing left to cancel.
    reverting = [a for a in assessed if a.revert_due
                 and (a.invoice.subscription_id is None or a.invoice.subscription_id in active_subs
                      or a.invoice.subscription_id not in known_subs)]
    attempt_hold = _recent_attempt_in_flight(snapshot, policy, now, unpaid_attempts, own) if reverting else None
    paying = bool(reverting) and (in_flight is not None or attempt_hold is not None)
    # The attempt's hold ends with the guard window (a bank debit's with its processing horizon),
    # outcome or not (a success whose invoice.paid never comes): time alone then changes the
    # decision, so it is a review moment.
    revert_held_until = attempt_hold[1] if attempt_hold is not None else None
    # The cancellation of a subscription supersedes reverting its upgrade: Account Management would
    # get a revert of a subscription it is cancelling (and may refuse it, blocking the account's
    # later rows). A revert requested before is no longer requested: a row of it still waiting is
    # superseded by the relay. Should the bad debt end with the subscription kept and the upgrade
    # still unpaid, the revert is requested again (the same request: one key per upgrade invoice).
    cancelling = {action.partition(":")[2] for action in actions}
    for a in reverting:
        if a.invoice.subscription_id in cancelling:
            reasons.append(Reason("upgrade.revert_superseded", "upgrade unpaid and its dunning run out, but its "
                                  "subscription is being cancelled: no revert",
                                  {"invoice": a.invoice.id, "subscription": a.invoice.subscription_id}))
        elif paying or a.invoice.id in covered:
            reasons.append(Reason("guard.revert_held", "a payment is in flight: the upgrade's revert waits for it",
                                  {"invoice": a.invoice.id}))
        else:
            actions.add(f"revert:{a.invoice.id}")
            reasons.append(Reason("upgrade.revert", "upgrade unpaid and its dunning run out: revert the upgrade, "
                                  "never cancel", {"invoice": a.invoice.id, "subscription": a.invoice.subscription_id}))

    # Another account's bad-debt payment in flight collects the invoices it covers: no automatic retry
    # of them beside it (the dispatcher skips it every tick, and this account's own invoices, retried
    # later, would wait behind it for the payment's outcome).
    for a in assessed:
        if a.next_retry_at is not None and a.invoice.id in covered:
            reasons.append(Reason("retry.held_bad_debt_payment", "a bad-debt payment is in flight: no automatic "
                                  "retry until its outcome", {"payment": covered[a.invoice.id].id,
                                                              "invoice": a.invoice.id}))
    retry = min((a for a in assessed if a.next_retry_at is not None and a.invoice.id not in covered),
                key=lambda a: (a.next_retry_at, a.invoice.id), default=None)
    if retry is not None and in_flight is not None:
        # The bad-debt payment in flight covers this debt: no automatic retry beside it (the payment
        # path would skip it anyway, and a plan that stays due would be dispatched every tick).
        reasons.append(Reason("retry.held_bad_debt_payment", "a bad-debt payment is in flight: no automatic retry "
                              "until its outcome", {"payment": in_flight.id, "invoice": retry.invoice.id}))
        retry = None
    # The failure PaymentFailed announces: of the unpaid invoices' own attempts, and the bad-debt
    # payments' intents wherever _owner filed them (a decline there is a failed payment, though no
    # failure of an invoice; it may be filed under a newer invoice that is not debt yet), those of
    # this debt only: an old one, of a debt long settled, is no news when a new invoice opens, also
    # when it was filed under the invoice that is unpaid now.
    debt_since = min((a.unpaid_since for a in assessed), default=None)
    paying_it = [f for f in bad_debt_intents(snapshot) if debt_since is not None and failure_time(f) >= debt_since]
    failures = list({f.id: f for f in (*(f for a in assessed for f in own.get(a.invoice.id, ())),
                                       *paying_it) if f.failed}.values())
    failures.sort(key=_failure_order)
    latest_failure = failures[-1] if failures else None
    current_class = _latest_class(assessed)
    # Every failure of the debt, oldest first: the change storing this decision announces each one
    # not announced yet (events.derive_events), so all of them are announced once it is stored.
    markers = tuple(failure_marker(f.id, failure_time(f)) for f in failures)
    kept = _announced_kept(snapshot, markers)

    state = DunningState(
        next_review_at=_next_review(assessed, policy, now,
                                    [held_until, revert_held_until,
                                     *_holds_end(snapshot, unpaid, unpaid_attempts, policy, now),
                                     *_coming_due(snapshot, now), _next_card_expiry(snapshot, now)]),
        status=status.value,
        level=level.value,
        failure_class=current_class.value if current_class else None,
        next_retry_at=retry.next_retry_at if retry else None,
        retry_invoice_id=retry.invoice.id if retry else None,
        retry_payment_method_id=retry.retry_method if retry else None,
        retry_free=retry.retry_free if retry else False,
        retries_used=sum(a.retries_used for a in assessed),
        outstanding_amount=sum(a.invoice.amount_remaining for a in assessed),
        outstanding=outstanding_by_currency(a.invoice for a in assessed),
        unpaid_since=min((a.unpaid_since for a in assessed), default=None),
        last_failure_id=failure_marker(latest_failure.id, failure_time(latest_failure)) if latest_failure else None,
        reasons=tuple(reasons),
        entitlements=entitlements(snapshot.subscriptions, [(a.invoice, a.level) for a in assessed], policy,
                                  billed_products(snapshot.subscriptions, snapshot.invoices)),
        actions_requested=tuple(sorted(actions)),
        policy_version=policy.version,
        prior_settled_at=_prior_settled_at(snapshot, status),
        announced_failures=markers + kept,
    )
    bad_debt_products: tuple[str, ...] = ()
    bad_debt_reason = None
    bad_debt_class = _latest_class(suspended)
    if suspended:
        bad_debt_products = tuple(sorted({p for a in suspended for p in a.invoice.products}))
        bad_debt_reason = "marked_uncollectible" if any(a.invoice.status == "uncollectible" for a in suspended) \
            else "retries_exhausted"
    return Decision(
        state=state,
        mandates=mandates(snapshot, now),
        bad_debt=status == Status.BAD_DEBT,
        bad_debt_reason=bad_debt_reason,
        bad_debt_products=bad_debt_products,
        bad_debt_failure_class=bad_debt_class.value if bad_debt_class else None,
        # How the debt ended: when nothing is unpaid any more, and when the account leaves bad debt
        # with another invoice still unpaid (BadDebtExited says whether its invoices were paid).
        resolution=_resolution(snapshot, grouped) if not assessed or _leaves_bad_debt(snapshot, status) else None,
        bad_debt_resolution=(_bad_debt_resolution(snapshot, grouped)
                             if _leaves_bad_debt(snapshot, status) and any(
                                 i.status in SETTLED_STATUSES for i in snapshot.invoices) else None),
        lifting_since=lifting_since,
        last_failure_class=classify(latest_failure.decline_code, latest_failure.failure_code,
                                    latest_failure.advice_code).value if latest_failure else None,
        stored_failure_at=_stored_failure_at(snapshot, latest_failure),
        failures=tuple((marker, classify(f.decline_code, f.failure_code, f.advice_code).value)
                       for marker, f in zip(markers, failures, strict=True)),
        assessments=tuple(assessed),
    )


def _announced_kept(snapshot: Snapshot, markers: Iterable[str]) -> tuple[str, ...]:
    """The stored announced failures to keep beside the decision's own (``markers``): every one that
    may still come back into a debt, so that it is never announced again. A failure leaves the
    decision when its attempt is filed under an invoice that is no debt, or when its attempt's
    status moves on, and both change as more events come: ``_owner`` guesses the invoice of an
    attempt no invoice names by the attempt's time, which moves with each event about the intent,
    and by the invoices' settlement times learned so far (a decline filed under an open invoice the
    account then turns out to have paid before it, or under one voided when its intent's late
    payment_intent.payment_failed moves it to another open invoice); an intent's success may come
    before its decline's event. Dropped with the debt, such a failure was announced a second time
    when it came back. It leaves for good only with an invoice that names its attempt (Stripe's
    link; the attempt can go to no other) once that invoice is settled, or with its attempt's row.
    A row from before announced_failures (NULL) announced its last_failure_id."""
    stored = snapshot.stored
    if stored is None:
        return ()
    announced = stored.announced_failures
    if announced is None:
        announced = (stored.last_failure_id,) if stored.last_failure_id else ()
    own = {parse_failure_marker(m)[0] for m in markers}
    rest = [m for m in announced if parse_failure_marker(m)[0] not in own]
    if not rest:
        return ()
    attempts = {a.id: a for a in snapshot.attempts}
    settled = {i.id for i in snapshot.invoices if i.status in SETTLED_STATUSES}
    kept = set()
    for marker in rest:
        attempt = attempts.get(parse_failure_marker(marker)[0])
        if attempt is None or attempt.invoice_id in settled:
            continue
        kept.add(marker)
    return tuple(sorted(kept))


def _latest_class(assessed: Iterable[InvoiceAssessment]) -> FailureClass | None:
    """The failure class of the invoice that failed last (unpaid last, of those with no failure)."""
    classes = [((failure_time(a.last_failure), a.last_failure.id) if a.last_failure else (a.unpaid_since, ""),
                a.failure_class) for a in assessed if a.failure_class is not None]
    return max(classes, key=lambda c: c[0])[1] if classes else None


def _failure_order(attempt: Attempt) -> tuple[datetime, str]:
    """Which failure is the latest: by when it happened, then (the same moment) by attempt id."""
    return failure_time(attempt), attempt.id


def _stored_failure_at(snapshot: Snapshot, latest: Attempt | None) -> datetime | None:
    """For a stored last_failure_id that is a plain attempt id (written before markers carried the
    failure's time) naming another attempt than the latest failure: that attempt's failure time, so
    that an older failure is not announced again on the first recompute after an upgrade."""
    stored = snapshot.stored
    if latest is None or stored is None or not stored.last_failure_id:
        return None
    attempt_id, failed_at = parse_failure_marker(stored.last_failure_id)
    if failed_at is not None or attempt_id == latest.id:
        return None
    named = next((a for a in snapshot.attempts if a.id == attempt_id), None)
    return failure_time(named) if named is not None else None


def _next_review(assessed: list[InvoiceAssessment], policy: Policy, now: datetime,
                 holds_end: list[datetime | None]) -> datetime | None:
    """When time alone would change this decision: the next day threshold of a level rule for an
    unpaid invoice, an invoice's due date, the end of a hold (the payment-flow guard's over bad
    debt or over an upgrade's revert, a payment in flight holding retries), or an attached card's
    expiry (_next_card_expiry). No event may come before then (a permanent decline has no retries),
    so beat recomputes the account at that moment."""
    moments = [a.unpaid_since + timedelta(days=rule.min_days) for a in assessed for rule in policy.rules
               if rule.min_days is not None]
    moments += [t for t in holds_end if t is not None]
    return min((t for t in moments if t > now), default=None)


def _next_card_expiry(snapshot: Snapshot, now: datetime) -> datetime | None:
    """The first moment an attached card still valid at ``now`` is no longer valid (card_expired: valid
    through the last day of its expiry month, UTC), the earliest of them; None when there is none.

    Its mandate turns ``expired`` then, and whatever the decision planned on it as of ``now`` (a retry
    due but not sent, a new card's free retry, a card never tried keeping the dunning going) no longer
    holds: no event comes, so it is a review moment."""
    last = _last_valid_month(snapshot, now)
    return _month_after(last) if last is not None else None


def _last_valid_month(snapshot: Snapshot, now: datetime) -> tuple[int, int] | None:
    """The earliest (exp_year, exp_month) of the attached cards not expired at ``now``: one pass over
    the cards, no time built (compute's shortcut for accounts with nothing unpaid runs it too)."""
    utc = now if now.tzinfo is UTC else now.astimezone(UTC)
    current = (utc.year, utc.month)
    last = None
    for pm in snapshot.payment_methods:
        if pm.attached and pm.exp_year is not None and pm.exp_month is not None:
            card = (pm.exp_year, pm.exp_month)
            if card >= current and (last is None or card < last):  # card_expired: card < current
                last = card
    return last


def _month_after(card: tuple[int, int]) -> datetime | None:
    """The first moment of the first month after a card's (exp_year, exp_month), as card_expired compares
    them; None past the last year a time holds."""
    year, month = card
    year, month = (year + 1, 1) if month >= 12 else (year, max(month, 0) + 1)
    return datetime(year, month, 1, tzinfo=UTC) if year <= 9999 else None


def _coming_due(snapshot: Snapshot, now: datetime) -> list[datetime]:
    """The due dates still to come of invoices sent with payment terms: each becomes debt then."""
    return [i.due_date for i in snapshot.invoices
            if i.due_date is not None and i.due_date > now and i.status == "open" and i.amount_remaining > 0]


def _holds_end(snapshot: Snapshot, unpaid: list[Invoice], unpaid_attempts: list[Attempt], policy: Policy,
               now: datetime) -> list[datetime]:
    """When the payments in flight that hold an unpaid invoice's retries stop holding them, if
    their outcome never comes (retry_cadence.plan_retry's in-flight rule)."""
    guard = timedelta(minutes=policy.guard_window_minutes)
    ends = [a.attempted_at + (PROCESSING_HORIZON if a.status in ("pending", "processing") else guard)
            for a in unpaid_attempts if attempt_in_flight(a, now, guard)]
    unpaid_ids = {i.id for i in unpaid}
    ends += [r.created_at + guard for r in snapshot.retries
             if r.invoice_id in unpaid_ids and r.state in IN_FLIGHT_RETRY_STATES and now - r.created_at < guard]
    return ends


def _standing(assessed: list[InvoiceAssessment]) -> tuple[Level, list[InvoiceAssessment], Status]:
    """What the assessments make of the account: its level (the most severe), its regular (not
    upgrade) invoices suspended, and its status (an upgrade never makes bad debt)."""
    level = max((a.level for a in assessed), key=lambda lv: lv.rank, default=Level.NONE)
    suspended = [a for a in assessed if not a.invoice.is_upgrade and a.level == Level.SUSPENDED]
    status = Status.BAD_DEBT if suspended else (Status.PAST_DUE if assessed else Status.CURRENT)
    return level, suspended, status


def _held_at(assessed: list[InvoiceAssessment], held: dict[str, Level]) -> list[InvoiceAssessment]:
    """The assessments with each invoice a guard holds at its held level."""
    return [_with_level(a, held[a.invoice.id]) if a.invoice.id in held else a for a in assessed]


def outstanding_by_currency(invoices: Iterable[Invoice]) -> tuple[tuple[str, int], ...]:
    """What the unpaid invoices owe, per currency (sorted by currency): amounts in different
    currencies never add up, so there is one amount per currency, upgrades included."""
    owed: dict[str, int] = {}
    for inv in invoices:
        owed[inv.currency] = owed.get(inv.currency, 0) + inv.amount_remaining
    return tuple(sorted(owed.items()))


def _balances(unpaid: list[Invoice]) -> dict[str, int]:
    """The account's unpaid balance of regular invoices, per currency: an account of several Stripe
    customers may be billed in several, and amounts in different currencies do not add up (300 cents
    and 300 euro cents are two small balances, not one of 600). An invoice's rules read its own."""
    balances: dict[str, int] = {}
    for inv in unpaid:
        if not inv.is_upgrade:
            balances[inv.currency] = balances.get(inv.currency, 0) + inv.amount_remaining
    return balances


def _held_level(a: InvoiceAssessment, balance: int, policy: Policy, now: datetime) -> Level:
    """The level of a suspended invoice without bad-debt consequences (its first matching rule below
    suspended): where the payment-flow guard holds it. Read from its own facts, not from the stored
    state, whose account level another invoice may raise in the same recompute: the next recompute
    would hold it higher, and running twice would change the entitlements."""
    below = [rule for rule in policy.rules if rule.level != Level.SUSPENDED]
    days = max(0, (now - a.unpaid_since).days)
    level, _ = _match_level(below, days, a.failure_class, a.exhausted, a.invoice.status == "uncollectible",
                            a.attempts, balance, a.invoice.currency)
    return level


def _with_level(a: InvoiceAssessment, level: Level) -> InvoiceAssessment:
    from dataclasses import replace

    return replace(a, level=level)
