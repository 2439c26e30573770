"""The rollout gate: measure health, ask the pure evaluate_gate, apply and audit what it decides.

Health is measured since the later of the stage start and the window start:

* remediations: drift records with a recompute enqueued;
* reverted: of those, the ones found drifted again the same way by a later sweep (the stored values
  of every drifted field back as they were: the remediation was undone or never took), or whose
  DRIFT_DETECTED recompute failed: its subs_stuck_events row is 'dead' (given up, for an operator).
  Not 'resolved' (it retried, then succeeded: the remediation took) nor 'retrying' (a passing
  failure, an outage or lock contention, that beat re-drives until it succeeds: not failed yet,
  and says nothing about the remediation being wrong; should it never take, a later sweep finds
  the account drifted the same way, which counts: the next one, or for a failure of the
  infrastructure (database, broker, lock contention) the first once it has failed for longer than
  gather_batch.REDRIVE_GRACE, the sweeps before counting the account pending, its recompute on its way);
* errors: the distinct accounts a sweep failed on in the window (rows that cannot be read, compute
  failures, recomputes that could not be sent other than by the broker's refusal, which defers the
  remediation to the re-drive: a remediation, no error), plus each error not about one account (a page
  whose requests could not be stored, a sweep that failed): sweep_error rows recorded since, not
  before_stage (every stage change marks those so far, rollout/store.py). One account that fails
  every sweep is one error, however many sweeps ran: visible, and no step back on its own unless
  [rollout] max_errors is 0 (no error tolerated: then it steps back every stage it fails a sweep
  at, each stage's health starting afresh, down to off, as that limit says);
* sweeps: sweeps that could remediate, begun and completed in the window (no health without them;
  one begun before the stage walked part of the accounts under the stage before).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime

from sqlalchemy import Connection, Engine

from app import metrics
from app.db import unit_of_work
from app.domain.policy import Policy
from app.domain.rollout import GateDecision, Health, evaluate_gate, health_since, rollout_policy, stage_index
from app.rollout.store import RolloutRow, change, missing_accounts, read_state, record_gate

log = logging.getLogger(__name__)

HEALTH_SQL = """
SELECT
  (SELECT count(*) FROM drift_record e WHERE e.remediated AND e.found_at >= %(since)s
     AND (%(stage)s IS NULL OR e.stage = %(stage)s)
     AND (%(visit)s IS NULL OR e.stage_revision IS NULL OR e.stage_revision = %(visit)s)) AS remediations,
  (SELECT count(*) FROM drift_record e
    WHERE e.remediated AND e.found_at >= %(since)s AND (%(stage)s IS NULL OR e.stage = %(stage)s)
      AND (%(visit)s IS NULL OR e.stage_revision IS NULL OR e.stage_revision = %(visit)s)
      AND (EXISTS (SELECT 1 FROM drift_record l
                    WHERE l.account_id = e.account_id AND l.found_at > e.found_at
                      AND l.sweep_id IS DISTINCT FROM e.sweep_id
                      -- drifted again the same way: every field back to the value it had, exactly
                      -- (not jsonb containment, under which any list contains the empty one)
                      AND NOT EXISTS (SELECT 1 FROM jsonb_each(e.stored) f
                                       WHERE l.stored -> f.key IS DISTINCT FROM f.value))
           OR EXISTS (SELECT 1 FROM subs_stuck_events s
                       WHERE s.account_id = e.account_id AND s.task_name = 'tasks.recompute_account'
                         AND s.task_args ->> 'trigger' = 'DRIFT_DETECTED' AND s.last_failed_at >= e.found_at
                         -- failed: dead only (see the module docstring)
                         AND s.state = 'dead')))
    AS reverted,
  (SELECT count(DISTINCT account_id) + count(*) FILTER (WHERE account_id IS NULL) FROM sweep_error
    WHERE NOT before_stage AND at >= %(since)s) AS errors,
  (SELECT count(*) FROM sweep_run
    WHERE NOT dry_run AND state = 'finished' AND started_at >= %(since)s AND finished_at >= %(since)s) AS sweeps
"""


def measure(conn: Connection, since: datetime, stage: str | None = None, stage_revision: int | None = None) -> Health:
    """Health since ``since``; with ``stage``, of the remediations requested at that stage only
    (drift_record.stage, the stage read in the transaction that requested them): those a page
    requested at the stage before a change, and recorded just after it (or stamped after it by a
    sweep host whose clock runs ahead of the gate's), are the stage before's, and must not step
    the new stage back again. With ``stage_revision``, of that visit of the stage only: a page that
    requested them on an earlier visit of the same stage (10% -> 25% -> 10% meanwhile) is the earlier
    visit's (rows recorded before drift_record.stage_revision was kept go by the stage's name)."""
    row = conn.exec_driver_sql(HEALTH_SQL, {"since": since, "stage": stage, "visit": stage_revision}).one()
    return Health(remediations=int(row.remediations), reverted=int(row.reverted), errors=int(row.errors),
                  sweeps=int(row.sweeps))


def check_gate(engine: Engine, policy: Policy, now: datetime) -> tuple[GateDecision, Health, RolloutRow]:
    """One gate check, in one transaction holding the rollout row, so an operator's change and the
    gate's never interleave. -> (decision, health, state after)."""
    limits = rollout_policy(policy.extra)
    with unit_of_work(engine) as conn:
        state = read_state(conn, for_update=True)
        status = state.status
        if state.stage == "named":  # named ids with no account exposed no one: the gate holds there
            status = replace(status, missing_named=tuple(missing_accounts(conn, state.named_accounts)))
        health = measure(conn, health_since(status, limits, now), state.stage, state.stage_revision)
        decision = evaluate_gate(status, health, limits, now)
        if decision.action in ("advance", "rollback"):
            # decided at the revision read under this lock: never a second step from a stage left
            # meanwhile, nor a step on a later visit of the same stage
            change(conn, decision.action, "gate", decision.reason, now, health.to_json(), from_stage=state.stage,
                   revision=decision.revision)
            log.warning("rollout gate: %s %s -> %s: %s", decision.action, state.stage, decision.to_stage,
                        decision.reason)
        record_gate(conn, decision.action, decision.reason, now)
        after = read_state(conn)
    metrics.ROLLOUT_STAGE.set(stage_index(after.stage))
    return decision, health, after
