"""Staged rollout of drift remediation (DESIGN section 6). Pure: no clock, no database.

Stages widen off -> named accounts -> 5% -> 10% -> 25% -> 50% -> 100%. Membership uses a stable
hash of the account id (never Python's ``hash()``, which is salted per process), so an account in
5% is in 10% and every larger stage, on every host and after every restart.

The gate decides from health measured since the current stage was entered (and within the
policy's health window): it advances after the soak time when healthy, steps back when the share
of remediations that were reverted/re-drifted or the number of errors (distinct accounts the
sweeps failed on, plus errors not about one account) exceeds the limits, and otherwise holds,
always with a reason. It never widens from 'named accounts' with nobody named, nor while none of
the named accounts exists (that stage, like off, has tested nothing). A held stage (an operator's
hold, or the gate's own after a step back) still steps back when breached; it only never advances
until someone resumes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from app.domain.policy import PolicyError

STAGES: tuple[str, ...] = ("off", "named", "5", "10", "25", "50", "100")
BUCKETS = 10_000


def bucket(account_id: str) -> int:
    """0..9999 from the first 8 bytes of sha256(account id): the same everywhere, forever."""
    digest = hashlib.sha256(account_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def percent(stage: str) -> int:
    """Share of all accounts a stage covers (off and named: 0)."""
    check_stage(stage)
    return int(stage) if stage.isdigit() else 0


def check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown rollout stage {stage!r}; stages: {', '.join(STAGES)}")


def in_stage(account_id: str, stage: str, named_accounts: Collection[str]) -> bool:
    """Is remediation enabled for this account at this stage? Nested by construction: named
    accounts are in every stage but off; a percentage stage takes the buckets below its share."""
    if stage == "off":
        check_stage(stage)
        return False
    if account_id in named_accounts:
        return True
    return bucket(account_id) < percent(stage) * (BUCKETS // 100)


def next_stage(stage: str) -> str | None:
    check_stage(stage)
    index = STAGES.index(stage)
    return STAGES[index + 1] if index + 1 < len(STAGES) else None


def previous_stage(stage: str) -> str | None:
    check_stage(stage)
    index = STAGES.index(stage)
    return STAGES[index - 1] if index > 0 else None


def stage_index(stage: str) -> int:
    check_stage(stage)
    return STAGES.index(stage)


def shortlist(ids: Collection[str], shown: int = 10) -> str:
    """Account ids as a short text: the first ``shown`` in order, then how many more."""
    ordered = sorted(ids)
    more = len(ordered) - shown
    return ", ".join(ordered[:shown]) + (f" and {more} more" if more > 0 else "")


def label(stage: str) -> str:
    check_stage(stage)
    return {"off": "off", "named": "named accounts"}.get(stage, f"{stage}%")


# --- the policy's limits --------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutPolicy:
    soak_hours: float = 24
    max_reverted_ratio: float = 0.02
    # Errors allowed in the window: distinct accounts the sweeps failed on (one failing every sweep is
    # one), plus each error not about one account (a page's requests not stored, a sweep that failed).
    # At 0 no error is tolerated: one account failing every sweep steps back every stage, down to off.
    max_errors: int = 5
    health_window_hours: float = 24
    # Remediations needed in the window before the gate trusts the ratio enough to advance.
    min_remediations: int = 0

    @property
    def soak(self) -> timedelta:
        return timedelta(hours=self.soak_hours)

    @property
    def health_window(self) -> timedelta:
        return timedelta(hours=self.health_window_hours)


MAX_ROLLOUT_HOURS = 365 * 24  # a soak or health window longer than a year is a typo
# The shortest soak: the drift sweep runs every 15 minutes (tasks/schedule.py) and a remediation shows
# as reverted only at a later sweep, so an hour is four sweeps. Shorter (0 above all), the gate
# widened at each check that followed a sweep: off -> 100% in about as many sweeps as stages.
MIN_SOAK_HOURS = 1
# The shortest health window, for the same sweeps: a remediation's revert is found by a sweep up to
# 15 minutes (or a sweep's length) later, and counts only while the remediation is inside the window.
# Shorter, a revert was forgotten before it was found (the gate never stepped back on reverts), and a
# sweep longer than the window never counted as a complete one (the gate never advanced).
MIN_HEALTH_WINDOW_HOURS = 1
MAX_ROLLOUT_COUNT = 1_000_000


def _number(section: Mapping[str, Any], key: str, default: float, maximum: float, whole: bool = False) -> float:
    value = section.get(key, default)
    path = f"rollout.{key}"
    if isinstance(value, bool) or not isinstance(value, int | float) or (whole and not isinstance(value, int)):
        raise PolicyError(path, "must be a whole number" if whole else "must be a number")
    if not math.isfinite(value):  # TOML has nan and inf: nan passes every comparison, inf overflows timedelta
        raise PolicyError(path, f"must be a finite number, got {value}")
    if value < 0:
        raise PolicyError(path, "must not be negative")
    if value > maximum:
        raise PolicyError(path, f"must be at most {maximum:g}, got {value:g}")
    return value


def rollout_policy(extra: Mapping[str, Any]) -> RolloutPolicy:
    """The [rollout] section of the policy file (``policy.extra``), validated; defaults when absent."""
    section = extra.get("rollout", {})
    if not isinstance(section, Mapping):
        raise PolicyError("rollout", "must be a table")
    known = {"soak_hours", "max_reverted_ratio", "max_errors", "health_window_hours", "min_remediations"}
    unknown = set(section) - known
    if unknown:
        raise PolicyError("rollout", f"unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    window = _number(section, "health_window_hours", RolloutPolicy.health_window_hours, MAX_ROLLOUT_HOURS)
    if window < MIN_HEALTH_WINDOW_HOURS:
        raise PolicyError("rollout.health_window_hours", f"must be at least {MIN_HEALTH_WINDOW_HOURS} hour, got "
                          f"{window:g}: a remediation counts as reverted when a later drift sweep (every 15 "
                          "minutes) finds it drifted again, and only while it is inside the window")
    soak = _number(section, "soak_hours", RolloutPolicy.soak_hours, MAX_ROLLOUT_HOURS)
    if soak < MIN_SOAK_HOURS:
        raise PolicyError("rollout.soak_hours", f"must be at least {MIN_SOAK_HOURS} hour, got {soak:g}: a stage "
                          "advances only after its soak with health inside the limits, and a reverted remediation "
                          "shows only at a later drift sweep (every 15 minutes)")
    return RolloutPolicy(
        soak_hours=soak,
        max_reverted_ratio=_number(section, "max_reverted_ratio", RolloutPolicy.max_reverted_ratio, 1),
        max_errors=int(_number(section, "max_errors", RolloutPolicy.max_errors, MAX_ROLLOUT_COUNT, whole=True)),
        health_window_hours=window,
        min_remediations=int(_number(section, "min_remediations", RolloutPolicy.min_remediations,
                                     MAX_ROLLOUT_COUNT, whole=True)),
    )


# --- the gate -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutStatus:
    stage: str
    held: bool
    stage_entered_at: datetime
    named_accounts: tuple[str, ...] = ()
    # The rollout's revision (one more at every audited change): a decision is about this one only.
    revision: int = 0
    # The named accounts with no subs_account row (a typo, an account deleted): remediated no one.
    missing_named: tuple[str, ...] = ()


@dataclass(frozen=True)
class Health:
    """Measured over the window the gate looks at (since the stage began, within the policy window)."""

    remediations: int = 0
    reverted: int = 0  # remediated, then found drifted again the same way, or its recompute failed
    # sweep errors since the stage began: distinct accounts failed on (unreadable rows, compute and
    # enqueue failures), plus each error not about one account (a page's requests, a failed sweep)
    errors: int = 0
    sweeps: int = 0  # sweeps begun and completed in the window

    @property
    def reverted_ratio(self) -> float:
        return self.reverted / self.remediations if self.remediations else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"remediations": self.remediations, "reverted": self.reverted, "errors": self.errors,
                "sweeps": self.sweeps, "reverted_ratio": round(self.reverted_ratio, 6)}


@dataclass(frozen=True)
class GateDecision:
    action: str  # advance | hold | rollback | none
    reason: str
    to_stage: str | None = None
    # The revision of the rollout it was decided at: its change is made at that revision only, never
    # on a later visit of the same stage (store.change).
    revision: int | None = None


def health_since(state: RolloutStatus, policy: RolloutPolicy, now: datetime) -> datetime:
    """Health counts from the later of the stage start and the window start, so data from a stage
    the gate already stepped back from never pushes it back again."""
    return max(state.stage_entered_at, now - policy.health_window)


def breaches(health: Health, policy: RolloutPolicy) -> list[str]:
    """The limits ``health`` is outside of, each said with its numbers (empty when healthy)."""
    ratio = health.reverted_ratio
    found = []
    if health.remediations and ratio > policy.max_reverted_ratio:
        found.append(f"reverted/re-drifted {health.reverted} of {health.remediations} remediations "
                     f"({ratio:.1%}) > limit {policy.max_reverted_ratio:.1%}")
    if health.errors > policy.max_errors:
        found.append(f"{health.errors} errors > limit {policy.max_errors}")
    return found


def evaluate_gate(state: RolloutStatus, health: Health, policy: RolloutPolicy, now: datetime) -> GateDecision:
    """What the gate does with ``state`` (at its revision, which the decision carries)."""
    return replace(_evaluate(state, health, policy, now), revision=state.revision)


def _evaluate(state: RolloutStatus, health: Health, policy: RolloutPolicy, now: datetime) -> GateDecision:
    if state.stage == "off":
        return GateDecision("none", "remediation is off; an operator starts the rollout")
    # Breaches come before the hold: a held stage still remediates, and hold only stops the gate
    # from advancing. The step back keeps it held (store.change), so it never widens by itself.
    breach = breaches(health, policy)
    if breach:
        back = previous_stage(state.stage)
        return GateDecision("rollback", f"step back from {label(state.stage)}: " + "; ".join(breach), back)
    if state.held:
        return GateDecision("none", f"held at {label(state.stage)}; an operator resumes the rollout")
    soaked = now - state.stage_entered_at
    if soaked < policy.soak:
        hours = soaked.total_seconds() / 3600
        return GateDecision("hold", f"soaking at {label(state.stage)}: {hours:.1f} h of {policy.soak_hours:g} h")
    target = next_stage(state.stage)
    if target is None:
        return GateDecision("none", "at 100%, healthy")
    if state.stage == "named" and not state.named_accounts:
        # Named with nobody named remediates no one, as off: widening from it to 5% of real customers
        # on no evidence would start the rollout by itself, which from off only an operator does.
        return GateDecision("hold", "no named accounts: the named stage has remediated no one; "
                                    "name accounts, or advance by hand")
    if state.stage == "named" and set(state.named_accounts) <= set(state.missing_named):
        # Named accounts that do not exist (typos, accounts deleted) exposed no one either: zero
        # remediations there is no health, only nobody to remediate.
        return GateDecision("hold", f"none of the named accounts exists ({shortlist(state.missing_named)}: "
                                    "no subs_account row): the named stage has remediated no one; "
                                    "name existing accounts, or advance by hand")
    if health.sweeps == 0:
        return GateDecision("hold", f"no completed sweep since {label(state.stage)} began: health unknown")
    if health.remediations < policy.min_remediations:
        return GateDecision("hold", f"{health.remediations} remediations so far; "
                                    f"{policy.min_remediations} needed before advancing")
    return GateDecision("advance", f"healthy after {policy.soak_hours:g} h soak at {label(state.stage)} "
                                   f"({health.reverted} of {health.remediations} reverted, {health.errors} errors)",
                        target)
