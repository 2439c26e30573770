"""One recompute: lock -> take the pending request -> gather -> compute -> apply -> emit, one transaction."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine

from app.db import unit_of_work
from app.domain.compute import Decision, compute
from app.domain.policy import Policy
from app.domain.rollout import in_stage
from app.domain.snapshot import decision_moment
from app.domain.state import outstanding_fields
from app.domain.triggers import Trigger
from app.recompute.apply import Applied, apply
from app.recompute.gather import gather
from app.rollout.store import read_state

log = logging.getLogger(__name__)


class AccountNotFound(LookupError):
    """The account does not exist in subs_account: bad data, retrying will not help."""


# The per-account advisory lock (hashtextextended: a stable 64-bit key per account id), then taking
# the pending request. One round trip, but two statements, and gather a third: in READ COMMITTED
# each statement reads its own snapshot, so gather's is taken after the lock is held and after the
# DELETE has waited for any webhook transaction still holding the request row; it therefore sees
# that webhook's data. (In one statement the snapshot would predate both waits.)
LOCK_AND_TAKE_SQL = (
    "SELECT pg_advisory_xact_lock(hashtextextended(%(account)s, 7281)); "
    "DELETE FROM recompute_request WHERE account_id = %(account)s RETURNING trigger, touched_at, cause, created_at"
)

# Stuck work of this task for the account (tasks/recompute.py: a run that kept failing, retrying or
# dead): every run is the full re-evaluation, so once one succeeds the failed one has nothing left to
# do. Another task's stuck work (a payment retry) is that task's to resolve.
# Resolved: no next re-drive (beat re-drives retrying rows only; the support page shows what is left).
RESOLVE_STUCK_SQL = """
UPDATE subs_stuck_events SET state = 'resolved', resolved_at = now(), next_redrive_at = NULL
 WHERE task_name = 'tasks.recompute_account' AND account_id = %(account)s AND state <> 'resolved'
"""

# A drift remediation (app/sweep/sweep.py) asked for by the sweep alone: its run takes the sweep's
# request (trigger DRIFT_DETECTED, cause drift_sweep:<run>) that no one asked for again since its
# insert (every upsert refreshes touched_at; created_at never changes). When the account is outside
# the rollout stage by now (a rollback, the gate's step back, or the account taken off the named list
# while it waited on the queue, or deferred by a broker that refused it until the re-drive sent it),
# the remediation is withdrawn: nothing is computed or applied, its drift_record is no longer a
# remediation (the stage it was requested at did not remediate it), and the stuck rows of its failed
# runs are resolved (the stuck re-drive would run it again without a request to look at).
REMEDIATION_CAUSE = "drift_sweep:"
WITHDRAW_REMEDIATION_SQL = """
UPDATE drift_record SET remediated = false, skipped = 'out_of_stage'
 WHERE account_id = %(account)s AND sweep_id = %(sweep)s AND remediated
"""
RESOLVE_REMEDIATION_STUCK_SQL = RESOLVE_STUCK_SQL.strip() + " AND task_args ->> 'trigger' = %(trigger)s"


@dataclass
class RecomputeResult:
    account_id: str
    trigger: str
    outcome: str  # changed | unchanged | coalesced | out_of_stage (a drift remediation withdrawn)
    decision: Decision | None = None
    applied: Applied | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"account_id": self.account_id, "trigger": self.trigger, "outcome": self.outcome}
        if self.decision is not None:
            state = self.decision.state
            out.update(status=state.status, level=state.level, failure_class=state.failure_class,
                       next_retry_at=state.next_retry_at.isoformat() if state.next_retry_at else None,
                       **outstanding_fields(state.outstanding),
                       reasons=[r.to_json() for r in state.reasons])
        if self.applied is not None:
            out.update(changed_fields=self.applied.changed_fields, version=self.applied.version,
                       events=[e.name for e in self.applied.events])
        return out


def run_recompute(
    engine: Engine,
    policy: Policy,
    account_id: str,
    trigger: str,
    now: datetime | None = None,
    coalesced: bool = False,
    taken: list[datetime] | None = None,
) -> RecomputeResult:
    """``now``: the moment to compute at; None (the task) reads the wall clock once the account's
    lock is held. Either way never before the stored decision's time (decision_moment).
    ``coalesced``: the run came from a pending request (webhooks); when another run already took
    that request there is nothing new to see and the run stops early. ``taken``:
    appended with the touched_at of the pending request the run took, if any, so that a caller
    whose run fails knows which version of the request it failed on (its delete is rolled back)."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with unit_of_work(engine) as conn:
        took = conn.exec_driver_sql(LOCK_AND_TAKE_SQL, {"account": account_id}).first()
        if took is not None and taken is not None:
            taken.append(took[1])
        if coalesced and took is None:
            return RecomputeResult(account_id, trigger, "coalesced")
        if took is not None and _withdrawn(conn, account_id, trigger, took):
            return RecomputeResult(account_id, trigger, "out_of_stage")
        # Read after the lock, never before: a run that waited for it (up to lock_timeout) behind
        # another recompute of the account must not compute at a moment older than the one that
        # run committed (it would ease a level just escalated at a day boundary, or leave and
        # re-enter bad debt at the 21-day one, opening a second episode).
        now = now if now is not None else datetime.now(UTC)
        t0 = time.perf_counter()
        gathered = gather(conn, account_id)
        if gathered is None:
            raise AccountNotFound(f"account {account_id!r} does not exist")
        snapshot, version = gathered
        # Nor at a moment older than the stored decision (its changed_at, read by gather): that run
        # may have been on a host whose clock is ahead of this one's (clock skew between hosts).
        # The decision, its events and its changed_at then never go back in time.
        now = decision_moment(snapshot, now)
        t1 = time.perf_counter()
        decision = compute(snapshot, policy, now)
        t2 = time.perf_counter()
        applied = apply(conn, snapshot, version, decision, trigger, now)
        if snapshot.open_stuck_events:  # gather counted them: no statement when there are none
            conn.exec_driver_sql(RESOLVE_STUCK_SQL, {"account": account_id})
        t3 = time.perf_counter()
    # "lock": the wait for the account's lock (another run of it) and the taking of its request.
    timings.update(lock=t0 - started, gather=t1 - t0, compute=t2 - t1, apply=t3 - t2,
                   commit=time.perf_counter() - t3)
    return RecomputeResult(account_id, trigger, "changed" if applied.wrote else "unchanged", decision, applied, timings)


def _withdrawn(conn: Any, account_id: str, trigger: str, took: Any) -> bool:
    """Whether this run is a drift remediation the sweep alone asked for (``took``: the request it
    took) of an account outside the rollout stage by now; if so it is withdrawn (see
    WITHDRAW_REMEDIATION_SQL above), in the transaction that took the request."""
    taken_trigger, touched_at, cause, created_at = took
    if not (trigger == taken_trigger == Trigger.DRIFT_DETECTED.value and touched_at == created_at
            and (cause or "").startswith(REMEDIATION_CAUSE)):
        return False
    rollout = read_state(conn)
    if in_stage(account_id, rollout.stage, rollout.named_accounts):
        return False
    sweep = cause.removeprefix(REMEDIATION_CAUSE)
    if sweep.isdigit():
        conn.exec_driver_sql(WITHDRAW_REMEDIATION_SQL, {"account": account_id, "sweep": int(sweep)})
    conn.exec_driver_sql(RESOLVE_REMEDIATION_STUCK_SQL, {"account": account_id, "trigger": trigger})
    log.warning("recompute of %s: drift remediation withdrawn, the account is outside the rollout stage (%s) now",
                account_id, rollout.stage)
    return True
