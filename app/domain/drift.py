"""Drift: where the stored dunning state disagrees with what compute decides now. Pure.

Only the fields that act on the customer or on collection are compared (status, level,
entitlements, retry plan, balances, requested actions) plus the subs_account.bad_debt flag.
Explanations (``reasons``) and the policy version are not drift on their own: a reworded reason
must not send every account to remediation.

The payment-flow guard lives here too: an account with a payment in flight is never remediated by
the sweep, whatever the stage (DESIGN section 6).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from operator import attrgetter
from typing import Any

from app.domain.compute import Decision
from app.domain.policy import Policy
from app.domain.retry_cadence import IN_FLIGHT_RETRY_STATES
from app.domain.snapshot import Snapshot
from app.domain.state import DunningState, Status, _normal

COMPARED_FIELDS: tuple[str, ...] = (
    "status", "level", "failure_class", "next_retry_at", "retry_invoice_id", "retry_payment_method_id",
    "retry_free", "retries_used", "outstanding_amount", "outstanding", "unpaid_since", "entitlements",
    "actions_requested",
)
_compared = attrgetter(*COMPARED_FIELDS)
BAD_DEBT_FLAG = "bad_debt_flag"
FRESH = DunningState()


def _json(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple):
        return [_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    return value


def _is_fresh(desired: DunningState) -> bool:
    """A new account with nothing unpaid: no subs_dunning row is the same as this."""
    return (desired.status == Status.CURRENT and desired.level == "none" and desired.failure_class is None
            and desired.next_retry_at is None and desired.outstanding_amount == 0 and desired.retries_used == 0
            and not desired.actions_requested
            and all(v == "full" for v in dict(desired.entitlements).get("products", {}).values())
            and dict(desired.entitlements).get("plan_changes", True) is True)


@dataclass(frozen=True)
class Drift:
    fields: tuple[str, ...]
    stored: dict[str, Any]  # the drifted fields only, JSON values
    desired: dict[str, Any]


def drift(stored: DunningState | None, stored_bad_debt_flag: bool, desired: DunningState,
          desired_bad_debt: bool) -> Drift | None:
    """The drifted fields, or None when the stored state is what compute decides."""
    if stored is not None and stored_bad_debt_flag == desired_bad_debt and (
            stored is desired or _compared(stored) == _compared(desired)):
        # The common case in one comparison: every field equal as it is is what the loop below
        # finds too (equal values never reach its normalised comparison).
        return None
    names: list[str] = []
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    if stored is None:
        if _is_fresh(desired) and not desired_bad_debt and not stored_bad_debt_flag:
            return None
        names.append("row")
        before["row"] = None
        after["row"] = "present"
    compare_to = stored if stored is not None else FRESH
    for name in COMPARED_FIELDS:
        was, now = getattr(compare_to, name), getattr(desired, name)
        if name == "outstanding" and was is None:
            continue  # stored before it was kept: not known, so no drift (its next recompute writes it)
        # Equal values are equal once normalised too; only unequal ones need the normalised
        # comparison DunningState.changed_fields makes (a list against a tuple is no change).
        if was == now or _normal(was) == _normal(now):
            continue
        names.append(name)
        before[name] = _json(was)
        after[name] = _json(now)
    if stored_bad_debt_flag != desired_bad_debt:
        names.append(BAD_DEBT_FLAG)
        before[BAD_DEBT_FLAG] = stored_bad_debt_flag
        after[BAD_DEBT_FLAG] = desired_bad_debt
    if not names or names == ["row"]:
        # Only the missing row itself differs (reasons, policy version): nothing acts differently.
        return None
    return Drift(tuple(names), before, after)


def drift_of(snapshot: Snapshot, decision: Decision) -> Drift | None:
    return drift(snapshot.stored, snapshot.stored_bad_debt_flag, decision.state, decision.bad_debt)


def payment_in_flight(snapshot: Snapshot, policy: Policy, now: datetime) -> str | None:
    """Why the sweep must keep its hands off this account now, or None.

    In flight: status lifting, a bad-debt payment pending (the account's, or another account's on an
    invoice it owns now), a Stripe attempt without outcome, or an
    automatic retry dispatched/charging/sent less than the guard window ago.
    """
    if snapshot.stored is not None and snapshot.stored.status == Status.LIFTING:
        return "lifting"
    if any(p.state == "pending" for p in (*snapshot.bad_debt_payments, *snapshot.payments_elsewhere)):
        return "bad_debt_payment_pending"
    guard = timedelta(minutes=policy.guard_window_minutes)
    if any(a.status in ("pending", "processing", "requires_action") and now - a.attempted_at < guard
           for a in snapshot.attempts):
        return "attempt_in_flight"
    if any(r.state in IN_FLIGHT_RETRY_STATES and now - r.created_at < guard for r in snapshot.retries):
        return "retry_in_flight"
    return None
