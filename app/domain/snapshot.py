"""Everything recompute knows about one account, as plain immutable facts.

Gather builds it from the stores; tests build it by hand. Times are timezone-aware UTC.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from app.domain.state import DunningState, MandateState


@dataclass(frozen=True)
class InvoiceLine:
    product: str
    amount: int
    # The subscription item the line bills, when Stripe says: a price change on an item credits and
    # charges that same item, which tells a plan swapped in from an add-on bought beside it.
    item: str | None = None


@dataclass(frozen=True)
class Invoice:
    id: str
    status: str  # draft | open | paid | void | uncollectible (open enum: anything else is open-like)
    billing_reason: str | None
    subscription_id: str | None
    amount_due: int
    amount_paid: int
    amount_remaining: int
    created: datetime
    lines: tuple[InvoiceLine, ...] = ()
    currency: str = "usd"
    total: int | None = None
    credited_amount: int = 0
    attempt_count: int = 0
    due_date: datetime | None = None
    first_failed_at: datetime | None = None
    last_failed_at: datetime | None = None
    paid_at: datetime | None = None
    voided_at: datetime | None = None
    marked_uncollectible_at: datetime | None = None
    # The Stripe customer it bills (an account may have several): only that customer's payment
    # methods can pay it. None in hand-built snapshots that do not say (any method of the account).
    stripe_customer_id: str | None = None
    # Its lines are the first ones only (the event's has_more), until beat fetches the whole list:
    # products on its other lines are not known yet.
    lines_incomplete: bool = False

    @property
    def is_upgrade(self) -> bool:
        return self.billing_reason == "subscription_update"

    @property
    def products(self) -> tuple[str, ...]:
        """Products this invoice charges for (positive lines; proration credits are not products)."""
        return tuple(dict.fromkeys(line.product for line in self.lines if line.amount > 0))

    @property
    def credited_products(self) -> tuple[str, ...]:
        """Products this invoice credits (negative lines): on a plan change, Stripe's proration credit
        for the unused time of what the subscription held before the change."""
        return tuple(dict.fromkeys(line.product for line in self.lines if line.amount < 0))


@dataclass(frozen=True)
class Charge:
    """One charge Stripe made on a payment intent: the unit card networks count."""

    id: str
    payment_method_id: str | None
    charged_at: datetime


@dataclass(frozen=True)
class Attempt:
    """One charge attempt as Stripe reported it: a payment intent (its latest charge), or a charge
    made without one."""

    id: str
    invoice_id: str | None
    payment_method_id: str | None
    status: str  # failed | succeeded | pending | refunded | ...
    attempted_at: datetime
    amount: int = 0
    amount_refunded: int = 0
    decline_code: str | None = None
    failure_code: str | None = None
    advice_code: str | None = None
    # Every charge the mirror heard of on this intent: Stripe confirms an invoice's intent again
    # for each retry, so one intent carries its first attempt and all the retries after it.
    charges: tuple[Charge, ...] = ()
    # When its latest failure that made no charge (a failed 3-D Secure) was reported; None while it
    # had none (and in rows from before the mirror kept it). Later events do not move it.
    failed_at: datetime | None = None
    # The Stripe customer whose charge or intent it is (None: not said, as an attempt known only
    # through invoice_payment.paid): an unlinked one can only have paid that customer's invoices.
    stripe_customer_id: str | None = None

    @property
    def failed(self) -> bool:
        return self.status == "failed"


@dataclass(frozen=True)
class PaymentMethod:
    id: str
    type: str
    attached: bool
    changed_at: datetime
    exp_month: int | None = None
    exp_year: int | None = None
    card_brand: str | None = None
    card_last4: str | None = None
    stripe_customer_id: str | None = None  # the Stripe customer it is attached to (None: not said)
    # Stripe's card.fingerprint: the same card number under every payment method id (a card removed
    # and added again gets a new id). Card networks count per card. None: not a card, or not known.
    fingerprint: str | None = None

    def expires_at(self) -> datetime | None:
        """The first moment (UTC) the card is expired: a card is valid through the last day of its
        expiry month, in UTC. None when the mirror has no (readable) expiry for it."""
        month, year = self.exp_month, self.exp_year
        if month is None or year is None or not 1 <= month <= 12 or not 1 <= year < 9999:
            return None
        return datetime(year + 1, 1, 1, tzinfo=UTC) if month == 12 else datetime(year, month + 1, 1, tzinfo=UTC)

    def expired(self, at: datetime) -> bool:
        """Whether the card is expired at ``at`` (Stripe declines it: expired_card), by the expiry
        the mirror has for it."""
        return card_expired(self.exp_year, self.exp_month, at)


def card_expired(exp_year: int | None, exp_month: int | None, at: datetime) -> bool:
    """Whether a card of that expiry is expired at ``at``: valid through the last day of its expiry
    month, in UTC (PaymentMethod.expired; the payment path checks the card it charges with it)."""
    utc = at.astimezone(UTC)
    return exp_year is not None and exp_month is not None and (exp_year, exp_month) < (utc.year, utc.month)


@dataclass(frozen=True)
class CustomerDefault:
    """One Stripe customer's default payment method (stripe_customer_state)."""

    stripe_customer_id: str
    payment_method_id: str | None
    changed_at: datetime | None


@dataclass(frozen=True)
class Subscription:
    id: str
    status: str
    products: tuple[str, ...] = ()
    # Its pause of payment collection as its events reported it, oldest first: (the event's epoch
    # second, pause_collection.behavior or None while collection is not paused).
    collection_paused: tuple[tuple[int, str | None], ...] = ()

    def collection_paused_at(self, at: datetime) -> str | None:
        """The pause_collection behavior in force at ``at``, as the latest event at or before it
        said; None when not paused, or when no event of it at or before then is known."""
        second = at.timestamp()
        behavior = None
        for when, said in self.collection_paused:
            if when > second:
                break
            behavior = said
        return behavior


def collection_paused(observed: Any) -> tuple[tuple[int, str | None], ...]:
    """Subscription.collection_paused of the mirror's column ({epoch second: behavior or null})."""
    if not observed:
        return ()
    return tuple(sorted((int(k), v if isinstance(v, str) else None) for k, v in observed.items()))


# Stripe's pause_collection behavior whose invoices it finalizes and marks uncollectible at once,
# with no payment attempt: the merchant gives the service for free meanwhile.
FORGIVING_PAUSE = "mark_uncollectible"


def marked_by_pause(invoice: Invoice, subscriptions: Mapping[str, Subscription],
                    attempts: Iterable[Attempt]) -> bool:
    """Whether the invoice was marked uncollectible because its subscription's collection was paused
    with mark_uncollectible: marked, created while the pause was in force, and never attempted
    (Stripe counted no attempt, no failure was reported, no failed attempt is filed under it:
    ``attempts``, its own). No debt: the merchant forgave it (DESIGN 4: Resolved). A marking outside
    such a pause, or of an invoice tried and failed, is a debt as before."""
    if invoice.marked_uncollectible_at is None or invoice.subscription_id is None:
        return False
    if invoice.attempt_count > 0 or invoice.first_failed_at is not None or any(a.failed for a in attempts):
        return False
    sub = subscriptions.get(invoice.subscription_id)
    return sub is not None and sub.collection_paused_at(invoice.created) == FORGIVING_PAUSE


def paused_markings(snapshot: Snapshot, own: Callable[[], Mapping[str | None, Iterable[Attempt]]]
                    ) -> frozenset[str]:
    """The ids of the snapshot's invoices marked uncollectible by a mark_uncollectible pause of their
    subscription's collection (marked_by_pause), whatever became of them since (paid or voided
    later). ``own`` gives the invoices' own attempts, by invoice id; it is called only when a
    subscription was ever reported paused so (most accounts never are)."""
    if not any(said == FORGIVING_PAUSE for s in snapshot.subscriptions for _, said in s.collection_paused):
        return frozenset()
    subs = {s.id: s for s in snapshot.subscriptions}
    grouped = own()
    return frozenset(i.id for i in snapshot.invoices if marked_by_pause(i, subs, grouped.get(i.id, ())))


@dataclass(frozen=True)
class Retry:
    """An automatic retry this product dispatched (from payment_retry)."""

    invoice_id: str
    payment_method_id: str | None
    retry_number: int
    free: bool
    state: str  # dispatched | charging | sent | skipped | failed | refused
    scheduled_for: datetime
    created_at: datetime  # the claim, by the clock of the beat host that made it
    # When its card last changed as the mirror held it at the claim (Stripe's clock; None: not known,
    # or no card named). A retry claimed knowing of a change was charged after it, whichever clock
    # beat's runs by against Stripe's (retry_cadence._tried_since).
    method_change_seen_at: datetime | None = None

    @property
    def charged(self) -> bool:
        """Whether it reached a card: a skipped one was never sent, a refused one Stripe turned down."""
        return self.state not in ("skipped", "refused")

    @property
    def counts(self) -> bool:
        """A retry that never charged, or a free one, does not count against the budget."""
        return not self.free and self.charged


@dataclass(frozen=True)
class BadDebtPayment:
    id: int
    state: str  # pending | succeeded | failed
    amount: int
    created_at: datetime
    updated_at: datetime
    failure_reason: str | None = None
    stripe_payment_intent_id: str | None = None  # its intent, once Stripe named it
    invoice_ids: tuple[str, ...] = ()  # the invoices it pays (quoted when it was made)


@dataclass(frozen=True)
class Snapshot:
    account_id: str
    stored: DunningState | None  # None: no subs_dunning row yet
    stored_bad_debt_flag: bool = False
    invoices: tuple[Invoice, ...] = ()
    attempts: tuple[Attempt, ...] = ()
    payment_methods: tuple[PaymentMethod, ...] = ()
    default_payment_method_id: str | None = None
    default_payment_method_changed_at: datetime | None = None
    # Each customer's default, the latest customer's first (default_payment_method_id above is the
    # first one's): a retry of an invoice may only use its own customer's default.
    customer_defaults: tuple[CustomerDefault, ...] = ()
    subscriptions: tuple[Subscription, ...] = ()
    retries: tuple[Retry, ...] = ()
    bad_debt_payments: tuple[BadDebtPayment, ...] = ()
    # Other accounts' bad-debt payments in flight (pending) that cover invoices this account owns
    # now: made before another team moved the invoices' Stripe customer here. Not this account's
    # payments (it cannot pay them, they are not its bad-debt intents), but the customer is paying.
    payments_elsewhere: tuple[BadDebtPayment, ...] = ()
    stored_mandates: tuple[MandateState, ...] = ()
    open_stuck_events: int = 0
    open_episode_entered_at: datetime | None = None
    # When the stored decision was made (subs_dunning.changed_at): no decision about the account is
    # computed at an earlier moment (decision_moment), whatever a host's clock says.
    stored_changed_at: datetime | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def default_of(self, customer: str | None) -> tuple[str | None, datetime | None]:
        """(default payment method, when it was made default) of one Stripe customer: Stripe charges
        a customer only with a method of its own. The account's (its latest customer's) where the
        customer is not said or the snapshot knows no customer's default apart."""
        if customer is None or not self.customer_defaults:
            return self.default_payment_method_id, self.default_payment_method_changed_at
        for d in self.customer_defaults:
            if d.stripe_customer_id == customer:
                return d.payment_method_id, d.changed_at
        return None, None

    def methods_of(self, customer: str | None) -> list[PaymentMethod]:
        """The payment methods of one Stripe customer (all where either side does not say)."""
        return [pm for pm in self.payment_methods
                if customer is None or pm.stripe_customer_id is None or pm.stripe_customer_id == customer]


T = TypeVar("T")


def trusted(cls: type[T], values: dict[str, Any]) -> T:
    """An instance of the frozen dataclass ``cls`` whose fields are ``values``, made without the
    generated __init__, for the drift sweep's hot path (one Snapshot per account): a frozen
    dataclass's __init__ sets each field through object.__setattr__, about 4 µs for a Snapshot
    here against well under 1 µs this way. ``values`` must name every field, defaults included
    (none is filled in); tests/integration/test_gather_batch.py compares the result with
    __init__'s, and a missing field fails that comparison."""
    instance = object.__new__(cls)
    object.__setattr__(instance, "__dict__", values)
    return instance


# How far ahead of a host's clock a stored decision's time is still taken for skew between hosts.
# Beyond it the deciding host's clock was wrong (a clock set hours or days ahead): following it
# would keep every host deciding in that host's future, escalations included, until real time caught
# up; the host's own clock decides instead, and undoes what the broken clock escalated.
MAX_CLOCK_LEAD = timedelta(minutes=5)


def decision_moment(snapshot: Snapshot, now: datetime) -> datetime:
    """The moment to decide about the account at: ``now`` (a host's clock), but never before the
    stored decision was made. Worker hosts' clocks differ (NTP drift, a paused VM): at a level's
    boundary a host behind would otherwise ease what a host ahead just escalated, and the next run
    escalate it again, each time with events for what never happened. A stored time more than
    MAX_CLOCK_LEAD ahead is no skew but a broken clock, and is not followed. Pure: the caller reads
    the clock, the snapshot carries the stored decision's time."""
    return not_before(snapshot.stored_changed_at, now)


def not_before(stored: datetime | None, now: datetime) -> datetime:
    """decision_moment's rule for any time another host stored with a judgement about the account (a
    decision's changed_at, the claim of a due retry): ``stored`` when it is later than ``now`` (a host's
    clock) by at most MAX_CLOCK_LEAD, else ``now``."""
    if stored is None or stored <= now or stored - now > MAX_CLOCK_LEAD:
        return now
    return stored
