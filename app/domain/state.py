"""The dunning state of one account: what subs_dunning stores and what compute decides."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    CURRENT = "current"
    PAST_DUE = "past_due"
    BAD_DEBT = "bad_debt"
    LIFTING = "lifting"  # a bad-debt payment is in flight


class Level(StrEnum):
    """Consequence levels, mildest first; the order is the escalation order."""

    NONE = "none"
    NOTICE = "notice"
    RESTRICT_PREMIUM = "restrict_premium"
    LIMITED = "limited"
    SUSPENDED = "suspended"

    @property
    def rank(self) -> int:
        return LEVEL_ORDER.index(self)


LEVEL_ORDER: tuple[Level, ...] = tuple(Level)


class FailureClass(StrEnum):
    PERMANENT = "permanent"
    ACTION_REQUIRED = "action_required"
    TRANSIENT = "transient"
    UNKNOWN = "unknown"


class Access(StrEnum):
    """What a product's entitlement is under the current consequences."""

    FULL = "full"
    PREMIUM_OFF = "premium_off"  # premium features off, core kept: an unpaid swap to a premium plan
    READ_ONLY = "read_only"
    WITHHELD = "withheld"  # an unpaid upgrade: the upgraded product only
    REVOKED = "revoked"


def iso(value: datetime | None) -> str | None:
    """A time as a reason fact (JSON)."""
    return value.isoformat() if value is not None else None


def failure_marker(attempt_id: str, failed_at: datetime) -> str:
    """subs_dunning.last_failure_id: the latest failure as "<attempt id>@<ISO time of the failure>".

    An attempt id alone does not name a failure: Stripe retries an invoice on the same payment
    intent, so one attempt carries every failed retry of its invoice. With its time the marker
    names one failure, and says whether another one is newer (events.PaymentFailed)."""
    return f"{attempt_id}@{failed_at.astimezone(UTC).isoformat()}"


def parse_failure_marker(marker: str) -> tuple[str, datetime | None]:
    """(attempt id, failure time) of a marker; the time is None for one stored before markers
    carried it (a plain attempt id)."""
    attempt_id, at, when = marker.rpartition("@")
    if at:
        try:
            failed_at = datetime.fromisoformat(when)
        except ValueError:
            failed_at = None
        if failed_at is not None and failed_at.tzinfo is not None:
            return attempt_id, failed_at
    return marker, None


@dataclass(frozen=True)
class Reason:
    """Why: which rule matched, in words, on which facts (JSON values only)."""

    rule: str
    detail: str
    facts: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "detail": self.detail, "facts": dict(self.facts)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Reason:
        return cls(rule=str(data["rule"]), detail=str(data.get("detail", "")), facts=dict(data.get("facts") or {}))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reason):
            return NotImplemented
        return (self.rule, self.detail, dict(self.facts)) == (other.rule, other.detail, dict(other.facts))

    def __hash__(self) -> int:
        return hash((self.rule, self.detail))


@dataclass(frozen=True)
class DunningState:
    """Every column of subs_dunning that a decision sets. Two equal states mean: write nothing."""

    status: str = Status.CURRENT
    level: str = Level.NONE
    failure_class: str | None = None
    next_retry_at: datetime | None = None
    retry_invoice_id: str | None = None
    retry_payment_method_id: str | None = None
    retry_free: bool = False
    retries_used: int = 0
    # The sum of the unpaid invoices' amount_remaining, whatever their currencies: kept for the
    # staleness check of the bad-debt payment and the callers that read the column; it means an amount
    # only when ``outstanding`` has one currency. What is shown is ``outstanding``.
    outstanding_amount: int = 0
    # What is owed per currency: ((currency, amount), ...) sorted by currency, () when nothing is.
    # None: stored before it was kept (the row's next recompute writes it), not known.
    outstanding: tuple[tuple[str, int], ...] | None = ()
    unpaid_since: datetime | None = None
    last_failure_id: str | None = None  # the latest failure: failure_marker(attempt id, when)
    reasons: tuple[Reason, ...] = ()
    entitlements: Mapping[str, Any] = field(default_factory=dict)
    actions_requested: tuple[str, ...] = ()
    policy_version: str | None = None
    next_review_at: datetime | None = None  # when time alone would change this decision
    # The latest settlement (paid_at, else voided_at) of the debts settled as the last decision in
    # current saw them: set while current, kept from there when the account enters dunning and while
    # it stays in it. Those were earlier dunnings' debts, whatever unpaid_since says (a failure
    # learned late dates it back over them); a debt failed and settled unseen, learned with the new
    # failure, is the new dunning's. None when none was settled, and in rows from before it was kept
    # (compute._resolution then goes by unpaid_since alone).
    prior_settled_at: datetime | None = None
    # The failures PaymentFailed has announced that are still part of the debt: the failure_marker of
    # each failure the decision sees (Decision.failures), as they are all announced by the change
    # that stores them. A failure not in it (nor an earlier failure of an attempt in it) is news,
    # however old: one learned late, its webhook delivered after a newer one's was announced, is
    # announced then. Bounded by the debt's failures and those announced that may come back into it
    # (compute._announced_kept: an attempt no invoice names, or whose invoice is still open); a failure
    # whose attempt an invoice names leaves it once that invoice is settled.
    # None: a row from before it was kept, whose last_failure_id was the latest announced (every
    # failure not newer than it counts as announced: events._unannounced_failures).
    announced_failures: tuple[str, ...] | None = ()

    def changed_fields(self, other: DunningState | None) -> list[str]:
        """Names of the fields where ``other`` (the stored state) differs from this one."""
        if other is None:
            return [f.name for f in fields(self)]
        changed = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            # Plain equality settles nearly every field; normalising (tuple vs list, Mapping vs
            # dict, Reason vs its JSON) is needed only when it says "different".
            if mine == theirs or _normal(mine) == _normal(theirs):
                continue
            changed.append(f.name)
        return changed

    def to_columns(self, names: list[str] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if names is not None and f.name not in names:
                continue
            value = getattr(self, f.name)
            if f.name == "reasons":
                value = [r.to_json() for r in value]
            elif f.name == "entitlements":
                value = dict(value)
            elif f.name == "actions_requested":
                value = list(value)
            elif f.name == "outstanding":
                value = outstanding_json(value)
            elif f.name == "announced_failures":
                value = list(value) if value is not None else None
            out[f.name] = value
        return out

    @classmethod
    def from_columns(cls, row: Mapping[str, Any]) -> DunningState:
        return cls(
            status=row["status"],
            level=row["level"],
            failure_class=row["failure_class"],
            next_retry_at=row["next_retry_at"],
            retry_invoice_id=row["retry_invoice_id"],
            retry_payment_method_id=row["retry_payment_method_id"],
            retry_free=bool(row["retry_free"]),
            retries_used=int(row["retries_used"]),
            outstanding_amount=int(row["outstanding_amount"]),
            outstanding=outstanding_of(row.get("outstanding"), int(row["outstanding_amount"])),
            unpaid_since=row["unpaid_since"],
            last_failure_id=row["last_failure_id"],
            reasons=tuple(Reason.from_json(r) for r in (row["reasons"] or [])),
            entitlements=dict(row["entitlements"] or {}),
            actions_requested=tuple(row["actions_requested"] or ()),
            policy_version=row["policy_version"],
            next_review_at=row.get("next_review_at"),
            prior_settled_at=row.get("prior_settled_at"),
            announced_failures=announced_failures_of(row.get("announced_failures"), row["last_failure_id"]),
        )


def announced_failures_of(value: Any, last_failure_id: str | None) -> tuple[str, ...] | None:
    """The stored announced_failures. NULL is a row from before the column: with no last_failure_id
    nothing of its debt was announced (()), else the failures not newer than it were (None)."""
    if value is not None:
        return tuple(str(m) for m in value)
    return () if last_failure_id is None else None


def outstanding_json(value: tuple[tuple[str, int], ...] | None) -> list[dict[str, Any]] | None:
    """The per-currency balance as stored and shown: [{"currency", "amount"}, ...], or None."""
    if value is None:
        return None
    return [{"currency": currency, "amount": amount} for currency, amount in value]


def outstanding_of(value: Any, amount: int) -> tuple[tuple[str, int], ...] | None:
    """The stored per-currency balance (outstanding_json's form) beside the stored outstanding_amount.
    A row stored before it was kept (NULL) owes nothing when its amount is 0, and is not known (None)
    otherwise. So is a list that does not add up to the stored amount: the previous release, during a
    deploy, writes outstanding_amount and not the list it does not know, which is then the decision
    before's."""
    owed = None if value is None else tuple(sorted((str(item["currency"]), int(item["amount"])) for item in value))
    if owed is None or sum(a for _, a in owed) != amount:
        return () if amount == 0 else None
    return owed


def outstanding_fields(outstanding: tuple[tuple[str, int], ...] | None) -> dict[str, Any]:
    """What is owed as the API, the support page and the CLI show it. ``outstanding``: one amount per
    currency. ``outstanding_amount``, kept for the callers that read it, is an amount only in one
    currency: 0 when nothing is owed, the amount when one currency is, and null when several are (no
    sum of them means anything) or when it is not known; ``outstanding_amount_reason`` says why it is
    null. ``outstanding_currency`` is the currency of ``outstanding_amount``."""
    if outstanding is None:
        return {"outstanding_amount": None, "outstanding_currency": None, "outstanding": None,
                "outstanding_amount_reason": "not known yet: the decision was stored before amounts were kept "
                                             "per currency; the account's next recompute stores them"}
    amount = outstanding[0][1] if len(outstanding) == 1 else 0 if not outstanding else None
    return {
        "outstanding_amount": amount,
        "outstanding_currency": outstanding[0][0] if len(outstanding) == 1 else None,
        "outstanding": outstanding_json(outstanding),
        "outstanding_amount_reason": None if amount is not None else (
            f"owed in several currencies ({', '.join(c for c, _ in outstanding)}), which do not add up: "
            "see outstanding for each one"),
    }


def _normal(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_normal(v) for v in value]
    if isinstance(value, Reason):
        return value.to_json()
    return value


@dataclass(frozen=True)
class MandateState:
    """subs_mandate as dunning sees a payment method."""

    payment_method_id: str
    type: str
    status: str  # usable | blocked | needs_action | expired | detached
    status_reason: str | None
    is_default: bool
    card_brand: str | None = None
    card_last4: str | None = None
    exp_month: int | None = None
    exp_year: int | None = None
