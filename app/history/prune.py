"""Removing history rows older than HISTORY_RETENTION_DAYS that nothing reads any more.

What is removed, by table, and why nothing needs it (every other table is kept whole: the Stripe
inbox is the source of truth and the webhooks' dedup, and audit_log, rollout_history, payment_retry,
bad_debt_payment and bad_debt_episode are records of money and of decisions):

* ``sweep_error`` (by ``at``), ``drift_record`` (by ``found_at``) and finished ``sweep_run`` rows (by
  ``finished_at``): the rollout gate is their only reader, and it counts them since the later of
  the stage's start and its health window's start (app/rollout/gate.py), never further back. So
  these go only once older than the health window too, whatever the retention says (it is checked
  at start to be at least that long: ``check_retention``), which keeps the errors the current
  stage's gate counts. A sweep still running keeps its rows, and so do its errors and drift.
* ``outbox`` rows the relay is done with (``delivered_at``: delivered, superseded or skipped): the
  relay, ``dunning outbox`` and /ops/outbox read the undelivered ones only, except the delivered
  cancellations, which are kept whatever their age: before it sends an upgrade's revert the relay
  looks for a cancellation of its subscription that Account Management took (relay.py
  _after_cancellation), and the account may ask for that revert long after (the mirror shows the
  subscription active until the lifecycle workflow has cancelled it, at an annual plan's end); they
  are a few per account that was in bad debt. Ids are never reused (a sequence), so the
  idempotency key ``outbox-<id>`` stays unique.
* ``subs_stuck_events`` rows ``resolved`` (by ``resolved_at``): decisions read the retrying and dead
  ones (recompute's open stuck count, the re-drives, the gate's failed remediations), and an alert
  is deduplicated against the unresolved ones only. The support page lists the unresolved first.

Rows go in batches (one statement and one transaction each, oldest first, rows locked by someone
else skipped), so no lock is held for long; one prune runs at a time (an advisory lock); beat's
task stops within a time budget and leaves the rest to its next run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine

from app import metrics
from app.config import ConfigError
from app.db import session_lock, unit_of_work
from app.domain.policy import Policy
from app.domain.rollout import rollout_policy

log = logging.getLogger(__name__)

LOCK = "history-prune"
BATCH_SIZE = 5_000

# A sweep still running (a segment to come) keeps its errors and drift records.
OF_NO_RUNNING_SWEEP = "NOT EXISTS (SELECT 1 FROM sweep_run r WHERE r.id = t.sweep_id AND r.state = 'running')"


# Delivered cancellations: the relay reads them (CANCELLATION_DELIVERED_SQL), whatever their age. The
# outbox's index by age (ix_outbox_prunable, app/models.py) leaves out the same rows, or each batch read
# them all again before the first row it removes: keep the two alike.
KEPT_OUTBOX = "t.event_type = 'CancellationRequested' AND t.state = 'delivered'"


@dataclass(frozen=True)
class History:
    table: str
    age: str  # the column a row's age is read from
    done: str  # what else must hold for the row to go, on alias t: it is done with
    read_by_gate: bool  # the rollout gate reads it within its health window


HISTORIES: tuple[History, ...] = (
    History("sweep_error", "at", OF_NO_RUNNING_SWEEP, read_by_gate=True),
    History("drift_record", "found_at", OF_NO_RUNNING_SWEEP, read_by_gate=True),
    History("sweep_run", "finished_at", "t.state <> 'running'", read_by_gate=True),
    History("outbox", "delivered_at", f"t.state IN ('delivered', 'superseded', 'skipped') AND NOT ({KEPT_OUTBOX})",
            read_by_gate=False),
    History("subs_stuck_events", "resolved_at", "t.state = 'resolved'", read_by_gate=False),
)
TABLES = tuple(h.table for h in HISTORIES)


def _due(h: History) -> str:
    return f"FROM {h.table} t WHERE t.{h.age} < %(cutoff)s AND {h.done}"


def _delete_sql(h: History) -> str:
    # SKIP LOCKED: a row someone holds (a rollout change marking every sweep error) waits for the next batch.
    # = ANY(ARRAY(...)): the batch's rows by primary key; with IN the planner hashed the batch's ids and
    # read the whole table to join them (30 ms at 400,000 outbox rows, growing with the table).
    return (f"DELETE FROM {h.table} WHERE id = ANY(ARRAY(SELECT t.id {_due(h)} "
            f"ORDER BY t.{h.age} LIMIT %(batch)s FOR UPDATE SKIP LOCKED))")


def _count_sql(h: History) -> str:
    return f"SELECT count(*) {_due(h)}"


def check_retention(days: int, policy: Policy) -> None:
    """ConfigError when HISTORY_RETENTION_DAYS is shorter than what the policy's rollout gate reads."""
    hours = rollout_policy(policy.extra).health_window_hours
    if timedelta(days=days) < timedelta(hours=hours):
        needed = math.ceil(hours / 24)
        raise ConfigError(
            f"HISTORY_RETENTION_DAYS is {days}, shorter than the rollout gate's health window in the policy file "
            f"(rollout.health_window_hours = {hours:g}, {hours / 24:.1f} days): the gate counts the sweep errors, "
            f"drift records and sweeps of that window; set HISTORY_RETENTION_DAYS to at least {needed}")


@dataclass(frozen=True)
class Cutoffs:
    history: datetime  # now - the retention
    gate: datetime  # the same, or the start of the gate's health window when that is earlier

    @classmethod
    def at(cls, now: datetime, days: int, policy: Policy) -> Cutoffs:
        history = now - timedelta(days=days)
        return cls(history, min(history, now - rollout_policy(policy.extra).health_window))

    def of(self, h: History) -> datetime:
        return self.gate if h.read_by_gate else self.history


@dataclass
class PruneReport:
    retention_days: int
    cutoffs: Cutoffs
    dry_run: bool = False
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLES, 0))
    finished: bool = True  # False: the time budget ran out with rows left (the next run goes on)
    skipped: str | None = None  # why nothing was done

    def to_json(self) -> dict[str, Any]:
        return {"retention_days": self.retention_days, "before": self.cutoffs.history.isoformat(),
                "gate_tables_before": self.cutoffs.gate.isoformat(), "dry_run": self.dry_run,
                "removed": dict(self.removed), "finished": self.finished, "skipped": self.skipped}


def prune(engine: Engine, policy: Policy, retention_days: int, now: datetime | None = None,
          batch_size: int = BATCH_SIZE, budget_seconds: float | None = None,
          clock: Callable[[], float] = time.monotonic) -> PruneReport:
    """Remove the history rows older than the retention, a batch per table in turn until every table
    is done or ``budget_seconds`` (None: no limit) is spent. Raises database errors (what was
    committed stays removed)."""
    report = PruneReport(retention_days, Cutoffs.at(now or datetime.now(UTC), retention_days, policy))
    with session_lock(engine, LOCK) as got:
        if not got:
            report.skipped = "another history prune is running"
            return report
        deadline = None if budget_seconds is None else clock() + budget_seconds
        left = list(HISTORIES)
        while left:
            for h in list(left):
                if deadline is not None and clock() >= deadline:
                    report.finished = False
                    return report
                removed = _delete_batch(engine, h, report.cutoffs.of(h), batch_size)
                report.removed[h.table] += removed
                if removed < batch_size:
                    left.remove(h)
    return report


def _delete_batch(engine: Engine, h: History, cutoff: datetime, batch_size: int) -> int:
    with unit_of_work(engine) as conn:
        removed = int(conn.exec_driver_sql(_delete_sql(h), {"cutoff": cutoff, "batch": batch_size}).rowcount)
    if removed:
        metrics.HISTORY_PRUNED.labels(h.table).inc(removed)
    return removed


def count_due(engine: Engine, policy: Policy, retention_days: int, now: datetime | None = None) -> PruneReport:
    """What ``prune`` would remove now (a dry run: nothing is written)."""
    report = PruneReport(retention_days, Cutoffs.at(now or datetime.now(UTC), retention_days, policy), dry_run=True)
    with unit_of_work(engine) as conn:
        for h in HISTORIES:
            report.removed[h.table] = int(conn.exec_driver_sql(_count_sql(h), {"cutoff": report.cutoffs.of(h)})
                                          .scalar_one())
    return report
