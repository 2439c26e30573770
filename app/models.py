"""Tables. Ownership follows DESIGN section 2:

* ``subs_account`` and ``subs_customer`` are shared: other teams insert the contract columns and
  every other column has a default or is nullable. This product writes ``subs_account.bad_debt``
  and nothing else there; it never writes ``subs_customer``.
* ``subs_dunning``, ``subs_mandate`` and ``subs_stuck_events`` belong to this product; recompute is
  the only writer of ``subs_dunning`` and ``subs_mandate``.
* The rest (Stripe inbox and mirror, outbox, retries, episodes, rollout, audit) are this
  product's own bookkeeping.

Schema changes are Alembic migrations (``dunning db upgrade``); the app never creates tables.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.shared_tables import STAND_IN_COMMENT

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

NOW = text("now()")
EMPTY_JSON_LIST = text("'[]'::jsonb")
EMPTY_JSON_OBJECT = text("'{}'::jsonb")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSONB, list[Any]: JSONB, datetime: DateTime(timezone=True)}


# --- shared tables (owned by Account Management / checkout) ---------------------------------


class Account(Base):
    __tablename__ = "subs_account"
    # Where this product creates it (no owner's table: dev, `make run`, tests): app/shared_tables.py.
    __table_args__ = {"comment": STAND_IN_COMMENT}

    account_id: Mapped[str] = mapped_column(Text, primary_key=True)
    bad_debt: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    name: Mapped[str | None] = mapped_column(Text)
    email: Mapped[str | None] = mapped_column(Text)
    billing_profile: Mapped[dict[str, Any]] = mapped_column(server_default=EMPTY_JSON_OBJECT)
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)


class Customer(Base):
    __tablename__ = "subs_customer"
    __table_args__ = {"comment": STAND_IN_COMMENT}

    stripe_customer_id: Mapped[str] = mapped_column(Text, primary_key=True)
    account_id: Mapped[str] = mapped_column(Text, ForeignKey("subs_account.account_id"), index=True)
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)


# --- this product's state ------------------------------------------------------------------


class Dunning(Base):
    """One row per account: the stored decision. Only recompute writes it."""

    __tablename__ = "subs_dunning"

    # No foreign key to subs_account: the owner deletes or renames its accounts whatever rows we keep
    # (migration dunning_no_fk_to_shared_account).
    account_id: Mapped[str] = mapped_column(Text, primary_key=True)
    status: Mapped[str] = mapped_column(Text, server_default="current")
    level: Mapped[str] = mapped_column(Text, server_default="none")
    failure_class: Mapped[str | None] = mapped_column(Text)
    next_retry_at: Mapped[datetime | None] = mapped_column(index=True)
    retry_invoice_id: Mapped[str | None] = mapped_column(Text)
    retry_payment_method_id: Mapped[str | None] = mapped_column(Text)
    retry_free: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    retries_used: Mapped[int] = mapped_column(Integer, server_default="0")
    # The sum of the unpaid invoices' amounts, whatever their currencies: an amount only when
    # ``outstanding`` holds one currency. ``outstanding`` is what is owed per currency
    # ([{"currency", "amount"}, ...]); NULL in rows stored before it was kept.
    outstanding_amount: Mapped[int] = mapped_column(BigInteger, server_default="0")
    outstanding: Mapped[list[Any] | None]
    unpaid_since: Mapped[datetime | None]
    last_failure_id: Mapped[str | None] = mapped_column(Text)
    reasons: Mapped[list[Any]] = mapped_column(server_default=EMPTY_JSON_LIST)
    entitlements: Mapped[dict[str, Any]] = mapped_column(server_default=EMPTY_JSON_OBJECT)
    # Subscriptions whose cancellation / upgrade revert this account has already requested, so a
    # request is emitted once per episode and not on every recompute.
    actions_requested: Mapped[list[Any]] = mapped_column(server_default=EMPTY_JSON_LIST)
    policy_version: Mapped[str | None] = mapped_column(Text)
    # When time alone would change the decision (a level's day threshold, a guard window's end): beat
    # recomputes the account then, as no event may come (a permanent decline has no retries).
    next_review_at: Mapped[datetime | None] = mapped_column(index=True)
    # The latest settlement of the debts settled as the last decision in current saw them (set while
    # current, kept through a dunning): an earlier dunning's, whatever a backdated unpaid_since says
    # (DunningResolved).
    prior_settled_at: Mapped[datetime | None]
    # The failure markers PaymentFailed has announced, of the debt still unpaid (each failure is
    # announced once, in whatever order its webhooks came). NULL: a row from before it was kept
    # (every failure not newer than last_failure_id was announced).
    announced_failures: Mapped[list[Any] | None]
    version: Mapped[int] = mapped_column(BigInteger, server_default="0")
    last_trigger: Mapped[str | None] = mapped_column(Text)
    changed_at: Mapped[datetime] = mapped_column(server_default=NOW)

    # The few accounts lifting (a bad-debt payment in flight), which every /metrics scrape counts
    # (app/metrics_db.py) and /ops/lifting lists: never a read of every account.
    __table_args__ = (Index("ix_subs_dunning_lifting", "account_id", postgresql_where=text("status = 'lifting'")),)


class Mandate(Base):
    """Payment methods on file as dunning sees them (usable, blocked, expired, detached)."""

    __tablename__ = "subs_mandate"

    payment_method_id: Mapped[str] = mapped_column(Text, primary_key=True)
    account_id: Mapped[str] = mapped_column(Text, index=True)
    type: Mapped[str] = mapped_column(Text, server_default="card")
    status: Mapped[str] = mapped_column(Text, server_default="usable")
    status_reason: Mapped[str | None] = mapped_column(Text)
    is_default: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    card_brand: Mapped[str | None] = mapped_column(Text)
    card_last4: Mapped[str | None] = mapped_column(Text)
    exp_month: Mapped[int | None] = mapped_column(Integer)
    exp_year: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(server_default=NOW)


class StuckEvent(Base):
    """Work that failed, in a visible state: retrying, dead or resolved. Never dropped while unresolved
    (a resolved row goes after HISTORY_RETENTION_DAYS, app/history/prune.py)."""

    __tablename__ = "subs_stuck_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    account_id: Mapped[str | None] = mapped_column(Text, index=True)
    stripe_event_id: Mapped[str | None] = mapped_column(Text)
    task_name: Mapped[str] = mapped_column(Text)
    task_args: Mapped[dict[str, Any]] = mapped_column(server_default=EMPTY_JSON_OBJECT)
    error_class: Mapped[str] = mapped_column(Text)
    error: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, server_default="1")
    state: Mapped[str] = mapped_column(Text, server_default="retrying")
    first_failed_at: Mapped[datetime] = mapped_column(server_default=NOW)
    last_failed_at: Mapped[datetime] = mapped_column(server_default=NOW)
    next_redrive_at: Mapped[datetime | None]
    resolved_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_subs_stuck_events_state", "state", "next_redrive_at"),)


# --- Stripe inbox and mirror (written by webhook ingest) ------------------------------------


class StripeEvent(Base):
    """Every accepted webhook, once (unique Stripe event id), raw body kept."""

    __tablename__ = "stripe_event"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    type: Mapped[str] = mapped_column(Text)
    stripe_created: Mapped[int] = mapped_column(BigInteger)
    stripe_customer_id: Mapped[str | None] = mapped_column(Text)
    account_id: Mapped[str | None] = mapped_column(Text)
    trigger: Mapped[str | None] = mapped_column(Text)
    # accepted: routed and a recompute requested; unroutable: no account for its customer yet, or
    # (an event naming no customer) no mirror row of its invoice or payment intent filed under one
    # (re-driven by beat when the mapping appears); ignored: type this product does not act on.
    state: Mapped[str] = mapped_column(Text)
    raw_body: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(server_default=NOW)
    processed_at: Mapped[datetime | None]
    # Of an event stored unroutable only (NULL for one routed at ingest): the invoice and the payment
    # intent it names, which the re-drive routes it by once the mirror files them under a customer
    # that maps to an account (migration event_route_ids).
    route_invoice_id: Mapped[str | None] = mapped_column(Text)
    route_payment_intent_id: Mapped[str | None] = mapped_column(Text)

    # Every webhook writes a row: indexed only where something looks events up, in the two states
    # that are re-driven (app/migrations/versions/stripe_event_lean_writes.py).
    __table_args__ = (
        Index("ix_stripe_event_unroutable_customer", "stripe_customer_id",
              postgresql_where=text("state = 'unroutable'")),
        Index("ix_stripe_event_enqueue_failed", "account_id", postgresql_where=text("state = 'enqueue_failed'")),
        # The re-drive's routing reads the unroutable events by these, never all of them (migration
        # unroutable_routing_cursor, app/redrive.py).
        Index("ix_stripe_event_unroutable_received", "received_at", "id",
              postgresql_where=text("state = 'unroutable'")),
        Index("ix_stripe_event_unroutable_invoice", "route_invoice_id",
              postgresql_where=text("state = 'unroutable' AND route_invoice_id IS NOT NULL")),
        Index("ix_stripe_event_unroutable_intent", "route_payment_intent_id",
              postgresql_where=text("state = 'unroutable' AND route_payment_intent_id IS NOT NULL")),
    )


class RedriveCursor(Base):
    """Where the re-drive's routing of unroutable events got to (app/redrive.py): ``mapped_customers``,
    the (created_at, stripe_customer_id) of the last subs_customer row it took (those after it are new
    to it), and ``unroutable_walk``, the (received_at, id) of the last event its walk read."""

    __tablename__ = "redrive_cursor"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    at: Mapped[datetime]
    after_id: Mapped[str] = mapped_column(Text)


class StripePassPause(Base):
    """The time a beat pass that asks Stripe (app/payments/stripe_pass.py; ``name`` is its lock's)
    may ask again after Stripe limited it: now() + the answer's ``Retry-After``, by the database's
    clock, shared by every worker."""

    __tablename__ = "stripe_pass_pause"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    not_before: Mapped[datetime]


class RecomputeRequest(Base):
    """At most one pending recompute per account: the coalescing token.

    Ingest upserts it in the transaction that stores the event and enqueues only when the upsert
    created it. The task deletes it, committed, before it gathers, so a change arriving while it
    runs inserts a new token and queues exactly one more. A run that fails rolls its delete back:
    the request stays pending (beat's stale-request re-drive sends it again).
    """

    __tablename__ = "recompute_request"

    account_id: Mapped[str] = mapped_column(Text, primary_key=True)
    trigger: Mapped[str] = mapped_column(Text)
    cause: Mapped[str | None] = mapped_column(Text)
    requested_at: Mapped[datetime] = mapped_column(server_default=NOW, index=True)
    # When it was last asked for: set on insert, refreshed (clock_timestamp()) by every upsert that
    # finds it pending. Not by the stale-request re-drive, which only sends it again.
    touched_at: Mapped[datetime] = mapped_column(server_default=NOW)
    # The touched_at of the version a recompute given up as dead had taken, set when that run is
    # recorded dead if nobody touched the request since (tasks.failures.PARK_REQUEST). While the two
    # are equal and the account's recompute is dead, the stale-request re-drive passes over it.
    parked_touch: Mapped[datetime | None]
    # When it was inserted; never changed after. Equal to touched_at while no one asked for the
    # account again (a drift remediation the sweep alone asked for: app/recompute/service.py).
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)


class StripeInvoice(Base):
    __tablename__ = "stripe_invoice"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    stripe_customer_id: Mapped[str] = mapped_column(Text, index=True)
    # The account this customer's rows are filed under (see MirrorCustomer); set by a trigger.
    account_key: Mapped[str | None] = mapped_column(Text, index=True)
    subscription_id: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    billing_reason: Mapped[str | None] = mapped_column(Text)
    currency: Mapped[str] = mapped_column(Text, server_default="usd")
    total: Mapped[int] = mapped_column(BigInteger, server_default="0")
    amount_due: Mapped[int] = mapped_column(BigInteger, server_default="0")
    amount_paid: Mapped[int] = mapped_column(BigInteger, server_default="0")
    amount_remaining: Mapped[int] = mapped_column(BigInteger, server_default="0")
    credited_amount: Mapped[int] = mapped_column(BigInteger, server_default="0")
    attempt_count: Mapped[int] = mapped_column(Integer, server_default="0")
    # [{"product": str, "amount": int, "item": subscription item id or null}] from the invoice lines
    lines: Mapped[list[Any]] = mapped_column(server_default=EMPTY_JSON_LIST)
    # The event's lines.has_more: ``lines`` holds the first lines only. Beat fetches the whole list
    # (app/payments/invoice_lines.py) and clears it; a later event does not set it again. Null: not
    # known (written before the column, or by the previous release during a deploy): the next event
    # decides, as for a draft.
    lines_incomplete: Mapped[bool | None] = mapped_column(Boolean)
    # When Stripe last refused to list the lines (asked again an hour later).
    lines_asked_at: Mapped[datetime | None]
    # When beat last asked Stripe for the lines, whatever came of it: the least recently asked go first.
    lines_tried_at: Mapped[datetime | None]
    created: Mapped[datetime]
    due_date: Mapped[datetime | None]
    first_failed_at: Mapped[datetime | None]
    last_failed_at: Mapped[datetime | None]
    paid_at: Mapped[datetime | None]
    voided_at: Mapped[datetime | None]
    marked_uncollectible_at: Mapped[datetime | None]
    # Ordering guard: the (event created, status rank) of the event this row reflects.
    source_created: Mapped[int] = mapped_column(BigInteger)
    source_rank: Mapped[int] = mapped_column(Integer)
    source_event_id: Mapped[str] = mapped_column(Text)
    # The last_failed_at whose attempt detail Stripe's API was asked for (app/payments/attempt_detail.py).
    detail_asked_for: Mapped[datetime | None]

    __table_args__ = (Index("ix_stripe_invoice_failed_open", "last_failed_at",
                            postgresql_where=text("status = 'open' AND last_failed_at IS NOT NULL")),
                      Index("ix_stripe_invoice_lines_incomplete", "id", postgresql_where=text("lines_incomplete")))


class StripePaymentAttempt(Base):
    """A charge attempt (keyed by payment intent when there is one, else by charge)."""

    __tablename__ = "stripe_payment_attempt"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    stripe_customer_id: Mapped[str | None] = mapped_column(Text, index=True)
    # The account this customer's rows are filed under (see MirrorCustomer); set by a trigger.
    account_key: Mapped[str | None] = mapped_column(Text, index=True)
    invoice_id: Mapped[str | None] = mapped_column(Text, index=True)
    charge_id: Mapped[str | None] = mapped_column(Text)
    payment_method_id: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    amount: Mapped[int] = mapped_column(BigInteger, server_default="0")
    amount_refunded: Mapped[int] = mapped_column(BigInteger, server_default="0")
    decline_code: Mapped[str | None] = mapped_column(Text)
    failure_code: Mapped[str | None] = mapped_column(Text)
    advice_code: Mapped[str | None] = mapped_column(Text)
    attempted_at: Mapped[datetime]
    # When its latest failure that made no charge (3-D Secure failed) was reported: the greatest
    # event time of those failures only (later events about the intent, its charges' and its
    # cancellation's, leave it). NULL while it had none. Such a failure has no charge time to go by.
    failed_at: Mapped[datetime | None]
    # What that newest failure that made no charge named: the intent's latest_charge when it failed
    # (the charges made before it: its place in a same-second tie with a charge's failure), and its
    # card (NULL where it named none: then the card is that charge's). NULL while it had none.
    failed_after_charge: Mapped[str | None] = mapped_column(Text)
    failed_method: Mapped[str | None] = mapped_column(Text)
    # charge id -> {"pm": payment method, "at": epoch seconds}: every charge made on the intent.
    charges: Mapped[dict[str, Any]] = mapped_column(server_default=EMPTY_JSON_OBJECT)
    source_created: Mapped[int] = mapped_column(BigInteger)
    source_rank: Mapped[int] = mapped_column(Integer)


class StripeSubscription(Base):
    __tablename__ = "stripe_subscription"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    stripe_customer_id: Mapped[str] = mapped_column(Text, index=True)
    # The account this customer's rows are filed under (see MirrorCustomer); set by a trigger.
    account_key: Mapped[str | None] = mapped_column(Text, index=True)
    status: Mapped[str] = mapped_column(Text)
    products: Mapped[list[Any]] = mapped_column(server_default=EMPTY_JSON_LIST)
    # The products before the change of items the row's event reported (previous_attributes.items),
    # NULL where it reported none: orders two events of one second (webhooks/store.py GUARDS).
    prev_products: Mapped[list[Any] | None]
    canceled_at: Mapped[datetime | None]
    # Its pause of payment collection as each of its events reported it: {event's epoch second:
    # pause_collection.behavior, or null while not paused} (webhooks/mirror.py _subscription_row).
    collection_paused: Mapped[dict[str, Any]] = mapped_column(server_default=EMPTY_JSON_OBJECT)
    source_created: Mapped[int] = mapped_column(BigInteger)
    source_rank: Mapped[int] = mapped_column(Integer)


class StripePaymentMethod(Base):
    __tablename__ = "stripe_payment_method"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    stripe_customer_id: Mapped[str | None] = mapped_column(Text, index=True)
    # The account this customer's rows are filed under (see MirrorCustomer); set by a trigger.
    account_key: Mapped[str | None] = mapped_column(Text, index=True)
    type: Mapped[str] = mapped_column(Text)
    attached: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    card_brand: Mapped[str | None] = mapped_column(Text)
    card_last4: Mapped[str | None] = mapped_column(Text)
    exp_month: Mapped[int | None] = mapped_column(Integer)
    exp_year: Mapped[int | None] = mapped_column(Integer)
    fingerprint: Mapped[str | None] = mapped_column(Text)
    # The card's kept fields an update changed, with their values before it (previous_attributes.card),
    # NULL where it changed none: orders two updates of one second (webhooks/store.py GUARDS).
    prev_card: Mapped[dict[str, Any] | None]
    # When the customer attached or updated it (or the card network updated it): a change
    # after a permanent decline earns one immediate retry.
    changed_at: Mapped[datetime]
    source_created: Mapped[int] = mapped_column(BigInteger)
    source_rank: Mapped[int] = mapped_column(Integer)


class StripeCustomerState(Base):
    """The Stripe customer's default payment method (from customer.updated)."""

    __tablename__ = "stripe_customer_state"

    stripe_customer_id: Mapped[str] = mapped_column(Text, primary_key=True)
    # The account this customer's rows are filed under (see MirrorCustomer); set by a trigger.
    account_key: Mapped[str | None] = mapped_column(Text, index=True)
    default_payment_method_id: Mapped[str | None] = mapped_column(Text)
    # When the default payment method last changed (an event's previous_attributes name it); NULL:
    # not since the mirror knows the customer.
    changed_at: Mapped[datetime | None]
    # The default before the change the row's event reported (previous_attributes), NULL where it
    # reported none or the customer had none: orders two changes of one second (webhooks/store.py).
    prev_default_payment_method_id: Mapped[str | None] = mapped_column(Text)
    source_created: Mapped[int] = mapped_column(BigInteger)
    source_rank: Mapped[int] = mapped_column(Integer, server_default="0")


class MirrorCustomer(Base):
    """Per Stripe customer, the account its mirror rows are filed under (``account_key``, NULL: none).

    Every mirror row of the customer carries this key (a trigger files new rows; app/sweep/refile.py
    files a customer again when subs_customer, the truth, names another account). The sweep reads
    a range of accounts' mirror rows by ``account_key`` where this agrees with subs_customer, and
    by customer where it does not (migration mirror_account_key says how writers stay consistent).
    """

    __tablename__ = "mirror_customer"

    stripe_customer_id: Mapped[str] = mapped_column(Text, primary_key=True)
    account_key: Mapped[str | None] = mapped_column(Text)
    filed_at: Mapped[datetime] = mapped_column(server_default=NOW)

    __table_args__ = (Index("ix_mirror_customer_account_key", "account_key", "stripe_customer_id"),)


# --- what recompute emits and what follows from it ----------------------------------------


class Outbox(Base):
    """Domain events written in the transaction that changed the state; a relay delivers them."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    account_id: Mapped[str] = mapped_column(Text)
    dunning_version: Mapped[int] = mapped_column(BigInteger)
    event_type: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)
    # When the relay was done with it: delivered, superseded or skipped (``state`` says which).
    delivered_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(server_default=NOW)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status: Mapped[int | None] = mapped_column(Integer)  # HTTP status of the last answer, None: no answer
    # First refused as wrong (a 4xx other than 408/409/425/429, or a 409 that lasts): blocked until
    # delivered or skipped.
    blocked_at: Mapped[datetime | None]
    # The first 409 of the row's current streak of them (None: none); a streak that lasts blocks it.
    conflict_since: Mapped[datetime | None]
    state: Mapped[str] = mapped_column(Text, server_default="pending")  # pending | delivered | superseded | skipped

    __table_args__ = (
        Index("ix_outbox_pending", "account_id", "id", postgresql_where=text("delivered_at IS NULL")),
        # The relay's pass reads the undelivered rows in id order; delivered ones are kept (for
        # HISTORY_RETENTION_DAYS).
        Index("ix_outbox_pending_by_id", "id", postgresql_where=text("delivered_at IS NULL")),
        # Retention removes the rows done with, oldest first (app/history/prune.py), but the delivered
        # cancellations it keeps: left out, so that a batch does not read them all again.
        Index("ix_outbox_prunable", "delivered_at",
              postgresql_where=text("delivered_at IS NOT NULL AND "
                                    "NOT (event_type = 'CancellationRequested' AND state = 'delivered')")),
        # The relay sends no upgrade revert after a delivered cancellation of its subscription
        # (app/outbox/relay.py, _after_cancellation).
        Index("ix_outbox_cancellations_delivered", "account_id",
              postgresql_where=text("event_type = 'CancellationRequested' AND state = 'delivered'")),
    )


class PaymentRetry(Base):
    """One automatic retry of an invoice: dispatched by beat, charged once (idempotency key)."""

    __tablename__ = "payment_retry"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    account_id: Mapped[str] = mapped_column(Text, index=True)
    invoice_id: Mapped[str] = mapped_column(Text, index=True)
    payment_method_id: Mapped[str | None] = mapped_column(Text)
    retry_number: Mapped[int] = mapped_column(Integer)
    free: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    idempotency_key: Mapped[str] = mapped_column(Text, unique=True)
    scheduled_for: Mapped[datetime]
    # dispatched -> charging -> sent | skipped | failed | refused (Stripe turned it down unsent)
    state: Mapped[str] = mapped_column(Text, server_default="dispatched")
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)
    updated_at: Mapped[datetime] = mapped_column(server_default=NOW)
    # What the mirror held at the claim, by Stripe's clock: the invoice's latest attempt, and when its
    # customer's default payment method last changed (NULL: none). The charge is stopped by a later
    # one (app/payments/pay.py ROW_SQL): Stripe's times are compared with Stripe's, not with created_at.
    attempts_seen_until: Mapped[datetime | None]
    default_change_seen_at: Mapped[datetime | None]
    # And when the claimed card last changed (compute: a retry claimed knowing of it tried the card after).
    method_change_seen_at: Mapped[datetime | None]

    # The rows claimed and not yet charged, which dispatch looks for every tick (app/payments/retries.py):
    # never a read of every retry ever made (the table is never pruned).
    __table_args__ = (
        Index("ix_payment_retry_dispatched", "created_at", postgresql_where=text("state = 'dispatched'")),
    )


class BadDebtPayment(Base):
    """A payment through POST /pay-bad-debt: its own path, one in flight per account."""

    __tablename__ = "bad_debt_payment"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    account_id: Mapped[str] = mapped_column(Text, index=True)
    idempotency_key: Mapped[str] = mapped_column(Text, unique=True)
    request_fingerprint: Mapped[str] = mapped_column(Text)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(Text, server_default="usd")
    invoice_ids: Mapped[list[Any]] = mapped_column(server_default=EMPTY_JSON_LIST)
    stripe_payment_intent_id: Mapped[str | None] = mapped_column(Text, index=True)
    # pending -> succeeded | failed
    state: Mapped[str] = mapped_column(Text, server_default="pending")
    failure_reason: Mapped[str | None] = mapped_column(Text)
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any] | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)
    updated_at: Mapped[datetime] = mapped_column(server_default=NOW)
    # Reconciling a payment whose outcome never arrived (app/payments/bad_debt_reconcile.py).
    stripe_customer_id: Mapped[str | None] = mapped_column(Text)
    stripe_status: Mapped[str | None] = mapped_column(Text)  # the intent's status at the last check
    reconcile_after: Mapped[datetime | None]
    reconcile_checks: Mapped[int] = mapped_column(Integer, server_default="0")
    not_found_since: Mapped[datetime | None]  # Stripe listed no intent for it since then
    # The customer's own payments on each invoice as Stripe listed them at the quote (settlement:
    # what the customer paid beyond them was paid twice).
    invoices_paid_before: Mapped[dict[str, Any]] = mapped_column(server_default=EMPTY_JSON_OBJECT)
    # What Stripe's invoices said at the quote, by invoice: {"amount_remaining",
    # "pre_payment_credit_notes_amount"} (settlement: a credit note since then was paid for too).
    invoices_quoted: Mapped[dict[str, Any]] = mapped_column(server_default=EMPTY_JSON_OBJECT)
    # Settlement's calls to pay each invoice out of band, by invoice: how many were sent.
    settle_sent: Mapped[dict[str, Any]] = mapped_column(server_default=EMPTY_JSON_OBJECT)

    __table_args__ = (
        Index(
            "uq_bad_debt_payment_in_flight",
            "account_id",
            unique=True,
            postgresql_where=text("state = 'pending'"),
        ),
        Index("ix_bad_debt_payment_pending", "created_at", postgresql_where=text("state = 'pending'")),
    )


class BadDebtEpisode(Base):
    __tablename__ = "bad_debt_episode"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    account_id: Mapped[str] = mapped_column(Text, index=True)
    entered_at: Mapped[datetime]
    reason: Mapped[str] = mapped_column(Text)
    failure_class: Mapped[str | None] = mapped_column(Text)
    products: Mapped[list[Any]] = mapped_column(server_default=EMPTY_JSON_LIST)
    exited_at: Mapped[datetime | None]
    exit_how: Mapped[str | None] = mapped_column(Text)
    duration_seconds: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        Index(
            "uq_bad_debt_episode_open", "account_id", unique=True, postgresql_where=text("exited_at IS NULL")
        ),
    )


# --- operations: sweeps, rollout, audit ----------------------------------------------------


class SweepRun(Base):
    __tablename__ = "sweep_run"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(server_default=NOW)
    finished_at: Mapped[datetime | None]
    dry_run: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    stage: Mapped[str | None] = mapped_column(Text)
    scanned: Mapped[int] = mapped_column(BigInteger, server_default="0")
    drifted: Mapped[int] = mapped_column(BigInteger, server_default="0")
    enqueued: Mapped[int] = mapped_column(BigInteger, server_default="0")
    state: Mapped[str] = mapped_column(Text, server_default="running")
    in_stage: Mapped[int] = mapped_column(BigInteger, server_default="0")
    guarded: Mapped[int] = mapped_column(BigInteger, server_default="0")
    errors: Mapped[int] = mapped_column(BigInteger, server_default="0")  # the whole sweep's running total
    # Its errors when the rollout stage last changed: an earlier stage's. The sweep's record only: the
    # gate counts sweep_error rows (by account), marked before_stage at the same moment.
    errors_before_stage: Mapped[int] = mapped_column(BigInteger, server_default="0")
    cursor: Mapped[str | None] = mapped_column(Text)  # last account id swept (chained batches resume here)
    note: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(server_default=NOW)  # heartbeat of a running sweep

    __table_args__ = (Index("ix_sweep_run_state", "state"),)


class DriftRecord(Base):
    __tablename__ = "drift_record"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    sweep_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    account_id: Mapped[str] = mapped_column(Text, index=True)
    found_at: Mapped[datetime] = mapped_column(server_default=NOW)
    stored: Mapped[dict[str, Any]] = mapped_column()
    desired: Mapped[dict[str, Any]] = mapped_column()
    fields: Mapped[list[Any]] = mapped_column(server_default=EMPTY_JSON_LIST)
    remediated: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    stage: Mapped[str | None] = mapped_column(Text)
    # The stage visit (rollout_state.stage_revision) its remediation was requested at: a stage left and
    # come back to is another visit, whose health this row is not part of. NULL before it was kept.
    stage_revision: Mapped[int | None] = mapped_column(BigInteger)
    skipped: Mapped[str | None] = mapped_column(Text)  # out_of_stage | guarded:<why> | dry_run | error

    __table_args__ = (Index("ix_drift_record_found_at", "found_at"),)


class SweepError(Base):
    """One error of a sweep: about an account (once per sweep), or about none (account_id NULL: a
    page whose requests could not be stored, the sweep failed). The rollout gate counts accounts."""

    __tablename__ = "sweep_error"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    sweep_id: Mapped[int] = mapped_column(BigInteger)
    account_id: Mapped[str | None] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)  # unreadable | compute | request | enqueue | failed
    # A failed sweep's failure class (tasks/failures.py FailureKind): a transient one that outlasted
    # its retries, or one that never retries. NULL for the other kinds.
    failure_class: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(server_default=NOW)
    # Recorded before the rollout stage last changed: an earlier stage's (the gate counts the rest).
    before_stage: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))

    __table_args__ = (
        Index("uq_sweep_error_account", "sweep_id", "account_id", unique=True),
        Index("ix_sweep_error_in_stage", "at", postgresql_where=text("NOT before_stage")),
        Index("ix_sweep_error_at", "at"),  # retention removes the oldest, any stage's (app/history/prune.py)
    )


class RolloutState(Base):
    """Staged remediation rollout: one row (id = 1)."""

    __tablename__ = "rollout_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    stage: Mapped[str] = mapped_column(Text, server_default="off")
    held: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    named_accounts: Mapped[list[Any]] = mapped_column(server_default=EMPTY_JSON_LIST)
    stage_entered_at: Mapped[datetime] = mapped_column(server_default=NOW)
    updated_at: Mapped[datetime] = mapped_column(server_default=NOW)
    last_gate_at: Mapped[datetime | None]
    last_gate_action: Mapped[str | None] = mapped_column(Text)
    last_gate_reason: Mapped[str | None] = mapped_column(Text)
    # One more at every audited change (advance, rollback, hold, resume, naming accounts): a change
    # decided at a revision is made only at it (app/rollout/store.py change).
    revision: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # The revision the current stage visit began at (a stage change, or a naming that restarted the
    # named stage): a stage left and come back to is another visit, with another stage_revision.
    stage_revision: Mapped[int] = mapped_column(BigInteger, server_default="0")


class RolloutHistory(Base):
    __tablename__ = "rollout_history"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    at: Mapped[datetime] = mapped_column(server_default=NOW)
    action: Mapped[str] = mapped_column(Text)
    from_stage: Mapped[str] = mapped_column(Text)
    to_stage: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    health: Mapped[dict[str, Any]] = mapped_column(server_default=EMPTY_JSON_OBJECT)
    revision: Mapped[int | None] = mapped_column(BigInteger)  # the rollout's revision this change made


class AuditLog(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    at: Mapped[datetime] = mapped_column(server_default=NOW)
    actor: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(Text)
    account_id: Mapped[str | None] = mapped_column(Text, index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(server_default=EMPTY_JSON_OBJECT)

    # GET /support/tasks/<id>: the recompute support started, by its task id (asked every 300 ms).
    __table_args__ = (Index("ix_audit_log_recompute_task", text("(detail->>'task_id')"),
                            postgresql_where=text("action = 'recompute'")),)


class SupportSessionEnded(Base):
    """A support session signed out of: refused from then on, whoever holds a copy of its cookie
    (app/support/auth.py). Kept while the session could still be within its lifetime."""

    __tablename__ = "support_session_ended"

    session_id: Mapped[str] = mapped_column(Text, primary_key=True)
    ended_at: Mapped[datetime] = mapped_column(server_default=NOW)


tables = Base.metadata.tables
