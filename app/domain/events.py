"""Domain events: past-tense facts about an account's payments, derived from a state change.

``derive_events(stored, decision, now)`` is pure: the same change always yields the same events,
and no change yields none. Apply writes each one to the outbox in the same transaction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from app.domain.compute import Decision
from app.domain.state import DunningState, Level, Status, parse_failure_marker


@dataclass(frozen=True)
class DomainEvent:
    @property
    def name(self) -> str:
        return type(self).__name__

    def payload(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DunningEntered(DomainEvent):
    unpaid_since: str | None
    failure_class: str | None


@dataclass(frozen=True)
class PaymentFailed(DomainEvent):
    """A failed payment not announced before, once, whatever the order its webhooks came in (an
    older failure learned after a newer one was announced too). ``attempt_id`` names its attempt
    (the payment intent, which carries every retry of its invoice), ``failure_class`` is that
    failure's."""

    attempt_id: str
    failure_class: str | None


@dataclass(frozen=True)
class ConsequenceEscalated(DomainEvent):
    from_level: str
    to_level: str


@dataclass(frozen=True)
class ConsequenceEased(DomainEvent):
    from_level: str
    to_level: str


@dataclass(frozen=True)
class BadDebtEntered(DomainEvent):
    reason: str
    failure_class: str | None
    products: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BadDebtExited(DomainEvent):
    # paid (the customer's money paid every debt settled in the episode) | resolved (one was voided,
    # credited or written off, or none was settled) | recomputed (no resolution known)
    how: str
    duration_seconds: int | None


@dataclass(frozen=True)
class BadDebtLifting(DomainEvent):
    since: str | None


@dataclass(frozen=True)
class DunningResolved(DomainEvent):
    how: str  # paid | resolved


@dataclass(frozen=True)
class EntitlementsChanged(DomainEvent):
    entitlements: dict[str, Any]


@dataclass(frozen=True)
class CancellationRequested(DomainEvent):
    subscription_id: str
    # The episode's reason (bad_debt_episode.reason), not the decision's of the moment: the relay
    # sends one request per key, and the key covers the subscription and the episode only.
    reason: str
    # When the bad-debt episode asking for it began: one cancellation per subscription and episode
    # (the relay's idempotency key), however often lifting and its failure take it away and back.
    episode: str | None = None


@dataclass(frozen=True)
class UpgradeRevertRequested(DomainEvent):
    invoice_id: str
    subscription_id: str | None


def entry_reason(decision: Decision) -> str:
    """Why the account enters bad debt: the reason of BadDebtEntered and of the episode it opens."""
    return decision.bad_debt_reason or "retries_exhausted"


def derive_events(
    stored: DunningState | None,
    decision: Decision,
    now: datetime,
    bad_debt_entered_at: datetime | None = None,
    bad_debt_reason: str | None = None,
) -> list[DomainEvent]:
    """``bad_debt_entered_at`` and ``bad_debt_reason``: the open bad-debt episode's start and reason
    (None when none is open: an episode entered now has this decision's)."""
    desired = decision.state
    before = stored or DunningState()
    events: list[DomainEvent] = []
    was_in_dunning = before.status != Status.CURRENT
    in_dunning = desired.status != Status.CURRENT

    if in_dunning and not was_in_dunning:
        events.append(DunningEntered(
            unpaid_since=desired.unpaid_since.isoformat() if desired.unpaid_since else None,
            failure_class=desired.failure_class,
        ))
    for marker, failure_class in _unannounced_failures(before, decision):
        attempt_id, _ = parse_failure_marker(marker)
        events.append(PaymentFailed(attempt_id=attempt_id, failure_class=failure_class))

    old_rank, new_rank = Level(before.level).rank, Level(desired.level).rank
    if new_rank > old_rank:
        events.append(ConsequenceEscalated(from_level=before.level, to_level=desired.level))
    elif new_rank < old_rank:
        events.append(ConsequenceEased(from_level=before.level, to_level=desired.level))

    # Entering bad debt, also straight into lifting: a bad-debt payment still in flight (of an earlier
    # episode, whose debts were settled otherwise) makes a new bad debt "lifting" at once. Its failure
    # later (lifting -> bad_debt) is no entry, so this is the only one.
    if (desired.status in (Status.BAD_DEBT, Status.LIFTING)
            and before.status not in (Status.BAD_DEBT, Status.LIFTING)):
        events.append(BadDebtEntered(
            reason=entry_reason(decision),
            # The failure that made the bad debt, not the account's latest (maybe another invoice's).
            failure_class=decision.bad_debt_failure_class,
            products=list(decision.bad_debt_products),
        ))
    if desired.status == Status.LIFTING and before.status != Status.LIFTING:
        events.append(BadDebtLifting(since=decision.lifting_since.isoformat() if decision.lifting_since else None))
    if before.status in (Status.BAD_DEBT, Status.LIFTING) and desired.status in (Status.CURRENT, Status.PAST_DUE):
        # Whole seconds, never below zero: what the closed episode row records (apply._episode).
        duration = max(0, int((now - bad_debt_entered_at).total_seconds())) if bad_debt_entered_at else None
        how = decision.bad_debt_resolution or decision.resolution or "recomputed"
        events.append(BadDebtExited(how=how, duration_seconds=duration))

    if was_in_dunning and not in_dunning:
        events.append(DunningResolved(how=decision.resolution or "resolved"))

    if dict(desired.entitlements) != dict(before.entitlements):
        events.append(EntitlementsChanged(entitlements=dict(desired.entitlements)))

    for action in sorted(set(desired.actions_requested) - set(before.actions_requested)):
        kind, _, ref = action.partition(":")
        if kind == "cancel":
            # Requested again in an open episode (a failed bad-debt payment): the same request as the
            # first, body included. The decision's reason may have changed since (an invoice marked
            # uncollectible), and another body under the same key is refused by Account Management.
            episode = (bad_debt_entered_at or now).isoformat()
            reason = (bad_debt_reason if bad_debt_entered_at else None) or entry_reason(decision)
            events.append(CancellationRequested(subscription_id=ref, reason=reason, episode=episode))
        elif kind == "revert":
            sub = next((a.invoice.subscription_id for a in decision.assessments if a.invoice.id == ref), None)
            events.append(UpgradeRevertRequested(invoice_id=ref, subscription_id=sub))
    return events


def _unannounced_failures(before: DunningState, decision: Decision) -> list[tuple[str, str | None]]:
    """The failures to announce, oldest first: (failure_marker, class). Each failure of the decision
    not among those the stored state announced (announced_failures), however old: one recompute may
    first see several (renewals of two subscriptions declined together, their webhooks coalesced),
    and an older failure may be learned after a newer one was announced (its webhooks late). A
    failure whose invoice was settled is no failure of the decision: never announced again."""
    announced = before.announced_failures
    if announced is None:
        return _newer_than_last_announced(before.last_failure_id, decision)
    found: list[tuple[str, str | None]] = [(m, c) for m, c in decision.failures if not _announced(m, announced)]
    latest = decision.state.last_failure_id
    if latest and not any(m == latest for m, _ in decision.failures) and not _announced(latest, announced):
        # A decision built without its failures (hand-made in a test) still announces its latest.
        found.append((latest, decision.last_failure_class))
    return found


def _announced(marker: str, announced: tuple[str, ...]) -> bool:
    """Whether the failure ``marker`` names was announced: its marker is in ``announced``, or one of
    the same attempt at a later time (the attempt's row keeps its latest failure only: that failure,
    announced, covers an earlier one of the same intent seen again)."""
    if marker in announced:
        return True
    attempt_id, failed_at = parse_failure_marker(marker)
    for other in announced:
        other_id, other_at = parse_failure_marker(other)
        if other_id == attempt_id and (failed_at is None or (other_at is not None and other_at >= failed_at)):
            return True
    return False


def _newer_than_last_announced(stored: str | None, decision: Decision) -> list[tuple[str, str | None]]:
    """For a row stored before announced_failures was kept: its last_failure_id was the latest failure
    announced, and every failure not newer than it counts as announced (so none is announced twice
    on the first recompute after the upgrade). None unless the latest is newer than the one stored;
    then every failure newer than that one. A stored plain attempt id (written before markers
    carried a time) announces the latest only, as before."""
    latest = decision.state.last_failure_id
    if not latest or not _newer_failure(latest, stored, decision.stored_failure_at):
        return []
    if stored is not None and parse_failure_marker(stored)[1] is None:
        return [(latest, decision.last_failure_class)]
    found: list[tuple[str, str | None]] = [(m, c) for m, c in decision.failures
                                           if _newer_failure(m, stored, decision.stored_failure_at)]
    # A decision built without its failures (hand-made in a test) still announces its latest.
    return found if any(m == latest for m, _ in found) else [(latest, decision.last_failure_class)]


def _newer_failure(desired: str, stored: str | None, stored_failure_at: datetime | None) -> bool:
    """Whether the latest failure (a state.failure_marker) is newer than the one stored, so not yet
    announced. Another retry failing on the same intent is newer (a later time); an older failure
    the account falls back to when a newer one's invoice is paid is not.

    A stored plain attempt id (written before markers carried a time) is older than any timed
    marker, except the same attempt's (the same failure, only the format changed) and an attempt
    whose failure ``stored_failure_at`` (compute read it from that attempt) shows is not older."""
    if stored is None:
        return True
    new_id, new_at = parse_failure_marker(desired)
    old_id, old_at = parse_failure_marker(stored)
    if new_at is None:
        return new_id != old_id
    if old_at is None:
        if old_id == new_id:
            return False
        if stored_failure_at is None:
            return True
        old_at = stored_failure_at
    return (new_at, new_id) > (old_at, old_id)
