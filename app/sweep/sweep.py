"""The drift sweep: walk every account in batches, compare stored with desired, remediate in stage.

Per batch: one gather statement for a keyset page of accounts (batch_read.py) -> the same pure
compute as recompute -> drift. An account whose recompute is already on its way (a request pending,
queued or in flight, or its review due: gather_batch.Pending) is not drift: its stored state lags by
design until that recompute runs, and a remediation would only take that recompute's place; it is
counted as ``pending``, nothing more; so is one whose stored state a recompute replaced since the
page was read (its version or bad-debt flag no longer the one read). A drifted account with a
payment in flight is left alone ("guarded"); one inside the rollout stage gets a DRIFT_DETECTED
recompute (the recompute task is still the only writer of dunning state), requested as every producer requests one (a
recompute_request row, then the task sent coalesced), so the next sweep sees it pending while it
waits on the queue; one outside is recorded only. Counts, the cursor, the
drift records and the errors are written once per batch, so memory stays flat whatever the number
of accounts; a batch's remediations are recorded (and counted) with their requests, before they are
sent, so that a batch whose record then fails, read again, has lost none of them.

An error is a sweep_error row about the account it concerns (its rows cannot be built into a
snapshot, its compute failed, its recompute could not be sent for a reason other than the broker),
at most one per account and sweep,
or about none (a page whose requests could not be stored, the sweep failed). The rollout gate
counts the accounts, so one account that fails every sweep is one error, not one per sweep. A
remediation whose send the broker refused is no error: its request is stored, and beat's
stale-request re-drive sends it once the broker takes it (late, not lost); it is a remediation,
"deferred", whose outcome the gate counts as any other's. A broker outage says nothing about
whether remediating was right, and counted per account it stepped the rollout back. A
page's errors are its stage visit's: written after the stage changed from the one the page worked at
(or was left and come back to: rollout_state.stage_revision), they are marked before_stage, as the
change marks those written before it; its drift records keep that visit (drift_record.stage_revision).

A sweep may be split into segments (one Celery task each, chained by the cursor in sweep_run) so
no task runs close to the broker's visibility timeout. A segment that fails on a failure that passes
(tasks/failures.py: the database or broker connection, lock contention) while its task may still
retry (``retry``) leaves its run 'running' at the cursor of the last page it recorded and raises
SweepRetry: the task sends the segment again with that class's backoff and jitter, and the page is
read again from there. Only a sweep that fails otherwise (its retries over, bad data, a bug) is
'failed', with a sweep_error naming its failure class, which the rollout gate counts. The advisory
lock keeps two segments from running at once; a fresh ``running`` sweep_run row (heartbeat
``updated_at``) keeps a new sweep from starting between two segments of the previous one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg2.extras import Json
from sqlalchemy import Connection, Engine

from app import metrics
from app.db import unit_of_work
from app.domain.compute import Decision, compute
from app.domain.drift import Drift, drift, payment_in_flight
from app.domain.policy import Policy
from app.domain.rollout import in_stage
from app.domain.snapshot import Snapshot, decision_moment
from app.domain.triggers import Trigger
from app.recompute.gather_batch import Pending
from app.rollout.store import RolloutRow, read_state
from app.sweep.batch_read import PageReader
from app.sweep.collector import fewer_collections
from app.sweep.lock import SweepBusy, sweep_lock
from tasks.failures import INFRASTRUCTURE, POLICIES, FailureKind, classify
from webhooks.store import request_recompute

log = logging.getLogger(__name__)

# Accounts per keyset page. Large enough that the read-ahead keeps up with compute (per-page round
# trips and transaction overhead are amortised: at 1,000,000 accounts the sweep waited for the
# database 29% of its time with pages of 500, 14% with 2,000) and small enough that a page's
# statement stays a few tens of milliseconds and memory stays flat.
BATCH_SIZE = 2000

# (account id, sweep run id) -> task id; raises on failure. Sends the account's DRIFT_DETECTED recompute,
# coalesced: its request (REMEDIATION_TRIGGER, remediation_cause) is stored by the sweep first.
Enqueue = Callable[[str, int | None], str]
REMEDIATION_TRIGGER = Trigger.DRIFT_DETECTED.value


# The failure classes a sweep segment is sent again on (its own backoff and jitter: tasks/failures.py
# POLICIES), resuming from the cursor: they pass with time and say nothing about the sweep's accounts.
RETRIED: frozenset[FailureKind] = INFRASTRUCTURE

# (failure class, whether this walk recorded a page before it failed) -> whether the segment is sent
# again (its task's retries for that class not over) rather than the sweep failing.
Retry = Callable[[FailureKind, bool], bool]


def retry_within(failures: int) -> Retry:
    """A segment after ``failures`` failures in a row may be sent again on a failure of a class whose
    retries (tasks/failures.py POLICIES) are not over, or whenever it recorded a page first (its
    failures in a row start over: a sweep that moves on between blips is never failed by them)."""
    return lambda kind, progressed: progressed or failures < POLICIES[kind].max_retries


class SweepRetry(Exception):
    """A segment of sweep ``run_id`` failed on a failure that passes (``kind``) and is to be sent again:
    its run is left 'running' at the cursor of the last page it recorded, and nothing counts against
    the rollout stage. ``progressed``: it recorded a page first (its failures in a row start over)."""

    def __init__(self, run_id: int, kind: FailureKind, progressed: bool, cause: BaseException) -> None:
        super().__init__(f"drift sweep {run_id}: segment failed ({kind.value}), to be retried from its cursor: "
                         f"{cause.__class__.__name__}")
        self.run_id = run_id
        self.kind = kind
        self.progressed = progressed


def remediation_cause(run_id: int | None) -> str:
    return f"drift_sweep:{run_id}"


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class SweepError:
    kind: str  # unreadable | compute | request | enqueue | failed
    account_id: str | None = None  # None: not about one account (a page's requests, the sweep itself)
    failure_class: str | None = None  # a failed sweep's (tasks/failures.py FailureKind)


@dataclass
class SweepReport:
    run_id: int | None
    stage: str
    dry_run: bool
    scanned: int = 0
    drifted: int = 0
    in_stage: int = 0  # drifted, not guarded, inside the stage: remediated (or would be, in a dry run)
    guarded: int = 0
    enqueued: int = 0
    # remediated, but the broker refused the send: the request waits for beat's stale-request re-drive.
    # Counted by this segment only, as ``pending``.
    deferred: int = 0
    errors: int = 0  # this sweep's sweep_error rows
    # drifted as read, but their recompute already on its way: not drift, not recorded. Counted by this
    # segment only (sweep_run has no column for it; the CLI's sweep is one segment).
    pending: int = 0
    cursor: str = ""
    finished: bool = False
    seconds: float = 0.0
    # wait: for the read-ahead's next page (the database was behind); gather: building the snapshots
    timings: dict[str, float] = field(default_factory=lambda: {"wait": 0.0, "gather": 0.0, "compute": 0.0,
                                                               "record": 0.0})
    drifted_accounts: list[dict[str, Any]] = field(default_factory=list)  # the first ``keep`` only
    unrecorded: list[SweepError] = field(default_factory=list)  # errors not yet written (this page's)
    # The visit of the stage the sweep works at (rollout_state.stage_revision, read with ``stage``): a
    # stage left and come back to is another visit, and what a page did on the earlier one is not its.
    stage_revision: int | None = None
    recorded_pages: int = 0  # pages this segment recorded (their counts and cursor committed)

    @property
    def out_of_stage(self) -> int:
        return self.drifted - self.guarded - self.in_stage

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "stage": self.stage, "dry_run": self.dry_run, "scanned": self.scanned,
                "drifted": self.drifted, "in_stage": self.in_stage, "out_of_stage": self.out_of_stage,
                "guarded": self.guarded, "enqueued": self.enqueued, "deferred": self.deferred, "errors": self.errors,
                "pending": self.pending,
                "finished": self.finished, "cursor": self.cursor, "seconds": round(self.seconds, 3),
                "drifted_accounts": self.drifted_accounts}


@dataclass(frozen=True)
class Found:
    account_id: str
    drift: Drift
    action: str  # remediate | deferred | out_of_stage | guarded:<why> | error
    remediated: bool
    # Its drift_record row (and its sweep_run counts) committed with its remediation's request
    # (_request), before the send: not written again with the page's record.
    recorded: bool = False


# Drifted inside the stage: remediated (sent, or deferred to the re-drive), or failed to be.
IN_STAGE_ACTIONS = ("remediate", "deferred", "error")


def _classify(account_id: str, guard: str | None, stage: str, named: tuple[str, ...]) -> str:
    if guard is not None:
        return f"guarded:{guard}"
    return "remediate" if in_stage(account_id, stage, named) else "out_of_stage"


class _PageDrifts:
    """drift() once per distinct (stored, desired) pair of a page. Most accounts of a page share
    both objects: the page's stored states are shared by equal rows (gather_batch._StoredStates) and
    compute shares its states for accounts with nothing unpaid. drift is pure, so the answer for a
    pair is the answer for every account with that pair. Keyed by identity, with the objects kept
    alive in the value so no id is reused while the page lasts; per page, so memory stays flat."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int, bool, bool], tuple[Any, Any, Drift | None]] = {}

    def of(self, snapshot: Snapshot, decision: Decision) -> Drift | None:
        stored, desired = snapshot.stored, decision.state
        key = (id(stored), id(desired), snapshot.stored_bad_debt_flag, decision.bad_debt)
        hit = self.seen.get(key)
        if hit is None:
            hit = self.seen[key] = (stored, desired, drift(stored, snapshot.stored_bad_debt_flag, desired,
                                                             decision.bad_debt))
        return hit[2]


class Sweeper:
    def __init__(self, engine: Engine, policy: Policy, enqueue: Enqueue | None, *, dry_run: bool = False,
                 batch_size: int = BATCH_SIZE, clock: Callable[[], datetime] = utcnow, keep: int = 20,
                 stale_after: timedelta = timedelta(minutes=15), retry: Retry | None = None) -> None:
        if enqueue is None and not dry_run:
            raise ValueError("a sweep that remediates needs a way to enqueue recomputes")
        self.engine = engine
        self.policy = policy
        self.enqueue = enqueue
        self.dry_run = dry_run
        self.batch_size = batch_size
        self.clock = clock
        self.keep = keep
        self.stale_after = stale_after
        # Whether a failure that passes (RETRIED) is retried from the cursor (SweepRetry, for the caller
        # to send the segment again: tasks.sweep_batch, or `dunning sweep` in its process). None: any
        # failure fails the sweep.
        self.retry = retry

    # --- entry points ------------------------------------------------------------------------

    def start(self, max_seconds: float | None = None) -> SweepReport:
        """A new sweep from the first account. Raises SweepBusy when one is running."""
        with sweep_lock(self.engine):
            run_id, rollout = self._begin()
            report = SweepReport(run_id, rollout.stage, self.dry_run, stage_revision=rollout.stage_revision)
            return self._walk(report, "", rollout.named_accounts, max_seconds)

    def resume(self, run_id: int, max_seconds: float | None = None) -> SweepReport:
        """The next segment of a chained sweep. Raises SweepBusy when another segment runs."""
        with sweep_lock(self.engine):
            with unit_of_work(self.engine) as conn:
                row = conn.exec_driver_sql(
                    "SELECT state, cursor, scanned, drifted, in_stage, guarded, enqueued, errors, started_at "
                    "FROM sweep_run WHERE id = %(id)s FOR UPDATE", {"id": run_id}).first()
                if row is None or row.state != "running":
                    raise SweepBusy(f"sweep {run_id} is not running ({row.state if row else 'missing'})")
                rollout = read_state(conn)
                conn.exec_driver_sql("UPDATE sweep_run SET updated_at = now(), stage = %(stage)s, note = NULL "
                                     "WHERE id = %(id)s", {"id": run_id, "stage": rollout.stage})
            report = SweepReport(run_id, rollout.stage, False, scanned=row.scanned, drifted=row.drifted,
                                 in_stage=row.in_stage, guarded=row.guarded, enqueued=row.enqueued, errors=row.errors,
                                 cursor=row.cursor or "", stage_revision=rollout.stage_revision)
            return self._walk(report, row.cursor or "", rollout.named_accounts, max_seconds)

    def interrupt(self, run_id: int) -> None:
        """Close sweep ``run_id``, left 'running' by a failed segment waiting for its retry, as an
        operator's Ctrl-C closes a segment: 'interrupted', nothing counted against the stage."""
        with unit_of_work(self.engine) as conn:
            conn.exec_driver_sql(
                "UPDATE sweep_run SET state = 'interrupted', updated_at = %(now)s, finished_at = %(now)s "
                "WHERE id = %(id)s AND state = 'running'", {"now": self.clock(), "id": run_id})

    def is_running(self, run_id: int) -> bool:
        """Whether sweep ``run_id`` still has accounts to walk (a segment to come), lock or no lock."""
        with unit_of_work(self.engine) as conn:
            state = conn.exec_driver_sql("SELECT state FROM sweep_run WHERE id = %(id)s", {"id": run_id}).scalar()
        return bool(state == "running")

    # --- the walk ----------------------------------------------------------------------------

    def _begin(self) -> tuple[int | None, RolloutRow]:
        with unit_of_work(self.engine) as conn:
            rollout = read_state(conn)
            if self.dry_run:
                return None, rollout
            running = conn.exec_driver_sql(
                "SELECT id, cursor, updated_at, note FROM sweep_run WHERE state = 'running' ORDER BY id FOR UPDATE"
            ).fetchall()
            for row in running:
                if row.note == UNCHAINED and row.updated_at > self.clock() - UNCHAINED_WAITS:
                    raise SweepBusy(f"sweep {row.id} is still running (at account {row.cursor or '-'}), its next "
                                    "segment not sent; not starting a second one", run_id=int(row.id), unchained=True)
                if row.updated_at > self.clock() - self.stale_after:
                    raise SweepBusy(f"sweep {row.id} is still running (at account {row.cursor or '-'}); "
                                    "not starting a second one", run_id=int(row.id))
                conn.exec_driver_sql(
                    "UPDATE sweep_run SET state = 'abandoned', finished_at = %(now)s, "
                    "note = 'no progress since ' || updated_at::text WHERE id = %(id)s",
                    {"id": row.id, "now": self.clock()})
                log.warning("drift sweep %s abandoned at cursor %s (no heartbeat)", row.id, row.cursor)
            run_id = conn.exec_driver_sql(
                "INSERT INTO sweep_run (started_at, updated_at, dry_run, stage, state) "
                "VALUES (%(now)s, %(now)s, false, %(stage)s, 'running') RETURNING id",
                {"now": self.clock(), "stage": rollout.stage}).scalar_one()
        return int(run_id), rollout

    def _walk(self, report: SweepReport, cursor: str, named: tuple[str, ...],
              max_seconds: float | None) -> SweepReport:
        started = time.perf_counter()
        failed: FailureKind | None = None
        interrupted = retrying = False
        try:
            with fewer_collections(), PageReader(self.engine, cursor, self.batch_size) as reader:
                try:
                    self._pages(report, reader, named, started, max_seconds)
                finally:
                    report.timings["wait"] += reader.waited
                    report.timings["gather"] -= reader.waited
        except KeyboardInterrupt:
            # An operator's Ctrl-C of `dunning sweep`: stopped, not failed. A failed sweep is an error
            # the rollout gate counts against the stage; an interruption says nothing about its health.
            interrupted = True
            raise
        except BaseException as exc:
            kind = classify(exc)
            progressed = report.recorded_pages > 0
            if self._retried(report, kind) and report.run_id is not None:
                log.warning("drift sweep %s: segment failed at cursor %s (%s: %s); sent again from there",
                            report.run_id, report.cursor or "-", kind.value, exc.__class__.__name__)
                retrying = True
                raise SweepRetry(report.run_id, kind, progressed, exc) from exc
            failed = kind
            raise
        finally:
            report.seconds += time.perf_counter() - started
            self._close(report, failed, interrupted, retrying)
        return report

    def _retried(self, report: SweepReport, kind: FailureKind) -> bool:
        """Whether a failure of class ``kind`` sends the segment again (SweepRetry) rather than fail the
        sweep or count as an error."""
        return (kind in RETRIED and self.retry is not None and not self.dry_run and report.run_id is not None
                and self.retry(kind, report.recorded_pages > 0))

    def _pages(self, report: SweepReport, reader: PageReader, named: tuple[str, ...], started: float,
               max_seconds: float | None) -> None:
        pages = iter(reader)
        while True:
            t0 = time.perf_counter()
            page = next(pages, None)
            # Waiting for the reader's next page, then building its snapshots (split at the end).
            report.timings["gather"] += time.perf_counter() - t0
            if page is None:  # (the last range returns below; this is a reader that ended early)
                report.finished = True
                return
            ids, gathered, upto, pending = page
            found = self._batch(report, ids, gathered, pending, named)
            if ids:
                report.cursor = ids[-1]
            t0 = time.perf_counter()
            self._record(report, found, len(ids))
            report.timings["record"] += time.perf_counter() - t0
            if upto is None:  # the last range
                report.finished = True
                return
            if max_seconds is not None and time.perf_counter() - started >= max_seconds:
                return

    def _batch(self, report: SweepReport, ids: list[str], gathered: dict[str, tuple[Snapshot, int]],
               pending: Pending, named: tuple[str, ...]) -> list[Found]:
        now = self.clock()
        t2 = time.perf_counter()
        found: list[Found] = []
        drifts = _PageDrifts()
        for account_id in ids:
            if account_id not in gathered:  # its rows could not be built into a snapshot (batch_read.build_page)
                _failed(report, "unreadable", account_id)
                continue
            snapshot, _version = gathered[account_id]
            try:
                # At the moment the account's own recompute would compute at: a sweep host whose clock
                # is behind the host that made the stored decision sees no drift from the skew alone.
                decision = compute(snapshot, self.policy, decision_moment(snapshot, now))
            except Exception:
                log.exception("drift sweep: compute failed for %s", account_id)
                _failed(report, "compute", account_id)
                continue
            drifted = drifts.of(snapshot, decision)
            if drifted is None:
                continue
            if pending.pending(account_id, now):  # its own recompute will store what compute decides
                report.pending += 1
                continue
            action = _classify(account_id, payment_in_flight(snapshot, self.policy, now), report.stage, named)
            found.append(Found(account_id, drifted, action, False))
        if found:
            found = self._as_read(report, found, gathered)
        if not self.dry_run:
            found = self._remediate(report, found, pending, gathered)
        report.timings["compute"] += time.perf_counter() - t2
        return found

    def _as_read(self, report: SweepReport, found: list[Found],
                 gathered: dict[str, tuple[Snapshot, int]]) -> list[Found]:
        """The drifted accounts whose stored state is still the one the page read. A recompute that
        committed since (a webhook's, taking its request with it: nothing pending any more) replaced
        the stored state this drift was measured on and decided afresh: recorded, it would report
        values no longer stored, and remediated, a recompute more the gate counts as a remediation.
        Such an account is counted as pending (its recompute came), an account gone is left out."""
        with unit_of_work(self.engine) as conn:
            now_stored = {r[0]: (bool(r[1]), int(r[2])) for r in conn.exec_driver_sql(
                STORED_NOW, {"ids": [f.account_id for f in found]})}
        out = []
        for f in found:
            snapshot, version = gathered[f.account_id]
            current = now_stored.get(f.account_id)
            if current == (snapshot.stored_bad_debt_flag, version):
                out.append(f)
            elif current is not None:
                report.pending += 1
        return out

    # --- remediation: a request, as every producer of recomputes makes one ------------------------

    def _remediate(self, report: SweepReport, found: list[Found], pending: Pending,
                   gathered: dict[str, tuple[Snapshot, int]]) -> list[Found]:
        """Request the DRIFT_DETECTED recompute of the page's accounts to remediate (one transaction),
        then send the requests this created. Through a request, as webhooks and the re-drive do: the
        run takes it (coalesced), a later sweep sees the account pending while it is queued (not the
        same drift again, which the gate would count as reverted), and a request whose message is
        lost is sent again by beat's stale-request re-drive."""
        todo = [f.account_id for f in found if f.action == "remediate"]
        if not todo:
            return found
        requested = self._request(report, todo, {a: (gathered[a][0].stored_bad_debt_flag, gathered[a][1])
                                                 for a in todo}, {f.account_id: f for f in found}, pending.stalled)
        if requested is None:  # could not store the requests: one error, of the page, not of its accounts
            _failed(report, "request")
        out: list[Found] = []
        refused = 0  # the page's sends deferred since the broker refused one
        recorded = report.run_id is not None  # those sent were recorded with their requests (_request)
        for f in found:
            if f.action != "remediate":
                out.append(f)
            elif requested is None:
                out.append(replace(f, action="error"))
            elif f.account_id not in requested[0]:  # the stage narrowed since the segment began
                out.append(replace(f, action="out_of_stage"))
            elif f.account_id in requested[2]:  # recomputed since the check as read: as _as_read finds it
                report.pending += 1
            elif f.account_id not in requested[1] and f.account_id not in pending.stalled:
                # Requested since the page was read (a webhook, a review): that recompute is on its way
                # and will repair this too; its producer sends it.
                report.pending += 1
            elif refused:
                # The broker refused this page's previous send: the rest wait for the re-drive as well,
                # untried. A broker that does not answer costs each send its connect timeouts, and tried
                # for every remediation of a wide stage's page, the segment ran past its soft time limit
                # and the sweep failed (an error the gate counts) before it recorded the page.
                refused += 1
                out.append(_sent(replace(f, action="deferred", remediated=True, recorded=recorded)))
            else:  # our request, or a stalled one we touched (touched, the re-drive would send it too)
                sent = _sent(self._send(report, replace(f, recorded=recorded)))
                refused = int(sent.action == "deferred")
                out.append(sent)
        if refused > 1:
            log.warning("drift sweep: %d more remediations of the page deferred to the re-drive untried", refused - 1)
        return out

    def _request(self, report: SweepReport, account_ids: list[str], read: dict[str, tuple[bool, int]],
                 found: dict[str, Found], stalled: frozenset[str]) -> tuple[set[str], set[str], set[str]] | None:
        """-> (the accounts still inside the rollout stage, those whose request this created, those
        a recompute changed since the page was read); None: the transaction failed. The stage is read
        again in the transaction that makes the requests: a segment walks for up to a minute
        (`dunning sweep`, every account), and an operator's rollback, the gate's step back or an
        account taken off the named list since it began must stop the remediations not requested
        yet, not only those of the next segment.

        ``read``: each account's bad-debt flag and version as the page read them. They are compared
        again once the requests are stored: _as_read compared them before, and a recompute that
        committed since (a webhook's, which took its request: this one is then new), or that held
        the request row this one waited for, replaced the state the drift was measured on. Such an
        account's new request is taken back and nothing is sent: it counts as pending, as in
        _as_read. So is an account deleted since (its owner's DELETE): nothing is sent for it.

        The remediations this requests (``found``: the page's drifts; ``stalled``: the accounts whose
        request no run is sure to take, which are sent too) are recorded in the same transaction:
        their drift_record rows and their counts in sweep_run. Should the page's own record fail
        after they were sent, the page is read again and finds them pending (their requests), never
        drifted again: recorded only with the page, they were lost, from the rollout gate's health
        (a reverted remediation unseen) and from the counts."""
        try:
            with unit_of_work(self.engine) as conn:
                rollout = read_state(conn)
                report.stage = rollout.stage  # the later pages are classified (and recorded) at it
                report.stage_revision = rollout.stage_revision
                inside = [a for a in account_ids if in_stage(a, rollout.stage, rollout.named_accounts)]
                created = {a for a in inside if request_recompute(
                    conn, a, REMEDIATION_TRIGGER, remediation_cause(report.run_id))}
                changed: set[str] = set()
                if inside:
                    now_stored = {r[0]: (bool(r[1]), int(r[2])) for r in conn.exec_driver_sql(
                        STORED_NOW, {"ids": inside})}
                    # An account no longer found (the owner deleted it since _as_read) is changed too:
                    # requested, its recompute could only end as a dead stuck row (AccountNotFound),
                    # which the rollout gate counts as a reverted remediation.
                    changed = {a for a in inside if now_stored.get(a) != read.get(a)}
                if changed & created:  # ours, made in this transaction: nobody else has seen them
                    conn.exec_driver_sql("DELETE FROM recompute_request WHERE account_id = ANY(%(ids)s)",
                                         {"ids": sorted(changed & created)})
                # Those _remediate sends (or defers to the re-drive): ours, or a stalled one touched.
                sending = [found[a] for a in inside if a not in changed and (a in created or a in stalled)]
                if sending and report.run_id is not None:
                    _record_remediations(conn, report, sending, self.clock())
                return set(inside), created - changed, changed
        except Exception as exc:
            if self._retried(report, classify(exc)):  # a database blip: the page is read again, requests and all
                raise
            log.exception("drift sweep: could not request the recompute of %d accounts", len(account_ids))
            return None

    def _send(self, report: SweepReport, f: Found) -> Found:
        assert self.enqueue is not None
        try:
            self.enqueue(f.account_id, report.run_id)
        except Exception as exc:
            if _broker_refused(exc):
                # The request stays (trigger DRIFT_DETECTED, this sweep's cause): beat's stale-request
                # re-drive sends it once the broker takes it. Late, not lost, and no evidence against
                # remediating: a remediation, whose outcome the gate counts, not an error.
                log.warning("drift sweep: the broker refused the recompute of %s (%s); the re-drive sends it",
                            f.account_id, exc.__class__.__name__)
                return replace(f, action="deferred", remediated=True)
            # Refused otherwise (a bug in sending it): an error. The request stays, and the re-drive
            # sends it as well.
            log.warning("drift sweep: could not enqueue the recompute of %s: %s", f.account_id,
                        exc.__class__.__name__)
            _failed(report, "enqueue", f.account_id)
            return replace(f, action="error")
        return replace(f, remediated=True)

    def _record(self, report: SweepReport, found: list[Found], scanned: int) -> None:
        batch = {"scanned": scanned, "drifted": len(found),
                 "in_stage": sum(1 for f in found if f.action in IN_STAGE_ACTIONS),
                 "guarded": sum(1 for f in found if f.action.startswith("guarded")),
                 "enqueued": sum(1 for f in found if f.remediated and f.action != "deferred")}
        report.scanned += scanned
        report.drifted += batch["drifted"]
        report.in_stage += batch["in_stage"]
        report.guarded += batch["guarded"]
        report.enqueued += batch["enqueued"]
        report.deferred += sum(1 for f in found if f.action == "deferred")
        for f in found:
            if len(report.drifted_accounts) < self.keep:
                report.drifted_accounts.append({"account_id": f.account_id, "fields": list(f.drift.fields),
                                                "action": f.action, "stored": f.drift.stored,
                                                "desired": f.drift.desired})
        if self.dry_run or report.run_id is None:
            _counted(report, found)
            report.recorded_pages += 1
            return
        now = self.clock()
        unrecorded = [f for f in found if not f.recorded]
        # Recorded with their requests as remediated; a send that failed otherwise than by the broker
        # is an error, as when recorded here (the request stays: the re-drive sends it).
        failed_sends = sorted(f.account_id for f in found if f.recorded and not f.remediated)
        with unit_of_work(self.engine) as conn:
            _record_errors(conn, report, now)
            if failed_sends:
                conn.exec_driver_sql(
                    "UPDATE drift_record SET remediated = false, skipped = 'error' "
                    "WHERE sweep_id = %(sweep)s AND account_id = ANY(%(ids)s) AND remediated",
                    {"sweep": report.run_id, "ids": failed_sends})
            if unrecorded:
                conn.exec_driver_sql(
                    "INSERT INTO drift_record (sweep_id, account_id, found_at, stored, desired, fields, remediated, "
                    "stage, stage_revision, skipped) VALUES (%(sweep)s, %(account)s, %(now)s, %(stored)s, %(desired)s, "
                    "%(fields)s, %(remediated)s, %(stage)s, %(stage_revision)s, %(skipped)s)",
                    [{"sweep": report.run_id, "account": f.account_id, "now": now, "stored": Json(f.drift.stored),
                      "desired": Json(f.drift.desired), "fields": Json(list(f.drift.fields)),
                      "remediated": f.remediated, "stage": report.stage, "stage_revision": report.stage_revision,
                      "skipped": None if f.remediated else f.action} for f in unrecorded],
                )
            conn.exec_driver_sql(
                "UPDATE sweep_run SET scanned = %(scanned)s, drifted = %(drifted)s, in_stage = %(in_stage)s, "
                "guarded = %(guarded)s, enqueued = %(enqueued)s, errors = %(errors)s, cursor = %(cursor)s, "
                "updated_at = %(now)s WHERE id = %(id)s",
                {"scanned": report.scanned, "drifted": report.drifted, "in_stage": report.in_stage,
                 "guarded": report.guarded, "enqueued": report.enqueued, "errors": report.errors,
                 "cursor": report.cursor, "now": now, "id": report.run_id},
            )
        _counted(report, found)
        report.recorded_pages += 1

    def _close(self, report: SweepReport, failed: FailureKind | None, interrupted: bool = False,
               retrying: bool = False) -> None:
        """Finished, failed or interrupted (a later sweep starts from scratch), or still running (a
        segment follows, or the failed one is sent again)."""
        if self.dry_run or report.run_id is None:
            _counted(report)
            return
        if retrying:
            self._keep_running(report)
            return
        state = "failed" if failed else "interrupted" if interrupted else "finished" if report.finished else "running"
        if failed:
            _failed(report, "failed", failure_class=failed.value)
        try:
            with unit_of_work(self.engine) as conn:
                _record_errors(conn, report, self.clock())
                conn.exec_driver_sql(
                    "UPDATE sweep_run SET errors = %(errors)s, updated_at = %(now)s, state = %(state)s, "
                    "finished_at = CASE WHEN %(state)s = 'running' THEN NULL ELSE %(now)s END WHERE id = %(id)s",
                    {"errors": report.errors, "now": self.clock(), "state": state, "id": report.run_id},
                )
            _counted(report)
        except Exception:
            if not (failed or interrupted):
                raise
            _counted(report)  # no page of this run is read again: they happened, recorded or not
            log.exception("drift sweep %s: could not record the failure", report.run_id)

    def _keep_running(self, report: SweepReport) -> None:
        """A segment to be sent again: its run stays 'running' at the cursor and counts of the last page
        it recorded (what a later segment resumes from). The errors of the page that failed are not
        written: that page is read again, and finds them again. The heartbeat is renewed when the
        database answers (it may be what failed: the run's row is then as the last page left it)."""
        report.unrecorded.clear()
        try:
            with unit_of_work(self.engine) as conn:
                conn.exec_driver_sql(
                    "UPDATE sweep_run SET updated_at = %(now)s WHERE id = %(id)s AND state = 'running'",
                    {"now": self.clock(), "id": report.run_id})
        except Exception as exc:
            log.warning("drift sweep %s: heartbeat not renewed: %s", report.run_id, exc.__class__.__name__)


# sweep_run.note of a running sweep whose next segment could not be sent (the broker refused it):
# beat's next drift_sweep chains it (tasks/sweeps.py), rather than finding it 'still running' until
# its heartbeat went stale (15 minutes), abandoning it and starting over from the first account.
# The segment that resumes it clears the note. It waits for that up to UNCHAINED_WAITS after its last
# page (the broker that refused the segment refuses beat's ticks too until it is back), past which it
# is abandoned as any stale sweep: after a longer outage the next sweep starts over, and `dunning
# sweep` run by hand without beat is kept waiting no longer than that.
UNCHAINED = "next segment not sent (the broker refused it): beat's drift_sweep resumes the sweep"
UNCHAINED_WAITS = timedelta(hours=1)


def leave_for_beat(engine: Engine, run_id: int) -> bool:
    """Mark running sweep ``run_id`` as waiting for beat's drift_sweep to send its next segment
    (UNCHAINED). False when it could not be marked (the database failed too, or the sweep is not
    running): it is then abandoned once its heartbeat is stale, as a segment lost any other way."""
    try:
        with unit_of_work(engine) as conn:
            marked = conn.exec_driver_sql(
                "UPDATE sweep_run SET note = %(note)s WHERE id = %(id)s AND state = 'running' RETURNING id",
                {"note": UNCHAINED, "id": run_id}).first()
    except Exception as exc:
        log.warning("drift sweep %s: could not leave it for beat: %s", run_id, exc.__class__.__name__)
        return False
    return marked is not None


# What a page's drift was measured on, as it is stored now: the subs_account flag and the state's
# version (every write of subs_dunning bumps it; no row: 0, as the page reads it).
STORED_NOW = ("SELECT a.account_id, a.bad_debt, coalesce(d.version, 0) FROM subs_account a "
              "LEFT JOIN subs_dunning d USING (account_id) WHERE a.account_id = ANY(%(ids)s)")


def _broker_refused(exc: BaseException) -> bool:
    """The broker did not take the message (app.dispatch wraps every failure to send in
    BrokerUnavailable; an enqueuer of another make may raise kombu's or a connection error): the
    broker's failure class, as classify names each of them."""
    return classify(exc) is FailureKind.BROKER_UNAVAILABLE


def _failed(report: SweepReport, kind: str, account_id: str | None = None, failure_class: str | None = None) -> None:
    report.errors += 1
    report.unrecorded.append(SweepError(kind, account_id, failure_class))


def _record_remediations(conn: Connection, report: SweepReport, sending: list[Found], now: datetime) -> None:
    """The page's remediations, recorded in the transaction that requests them (Sweeper._request):
    remediated at the stage visit read there, and counted in sweep_run as drifted, in stage and
    enqueued. The page's record (Sweeper._record) writes the run's counts whole, as the segment
    counted them (a send the broker refused is no enqueue, one failing otherwise no remediation);
    should it fail, what is written here stays, and the segment sent again resumes from it."""
    conn.exec_driver_sql(
        "INSERT INTO drift_record (sweep_id, account_id, found_at, stored, desired, fields, remediated, "
        "stage, stage_revision, skipped) VALUES (%(sweep)s, %(account)s, %(now)s, %(stored)s, %(desired)s, "
        "%(fields)s, true, %(stage)s, %(stage_revision)s, NULL)",
        [{"sweep": report.run_id, "account": f.account_id, "now": now, "stored": Json(f.drift.stored),
          "desired": Json(f.drift.desired), "fields": Json(list(f.drift.fields)), "stage": report.stage,
          "stage_revision": report.stage_revision} for f in sending],
    )
    conn.exec_driver_sql(
        "UPDATE sweep_run SET drifted = drifted + %(n)s, in_stage = in_stage + %(n)s, enqueued = enqueued + %(n)s, "
        "updated_at = %(now)s WHERE id = %(id)s", {"n": len(sending), "now": now, "id": report.run_id})


def _sent(f: Found) -> Found:
    """A remediation recorded with its request, counted in the metrics once sent (or deferred, or
    failed to be): it is never found drifted again by a second reading of its page (its request
    is pending), so counted with the page's record, after it, it went uncounted when that failed."""
    if f.recorded:
        metrics.DRIFT_FOUND.labels("true").inc()
        if f.remediated:
            metrics.DRIFT_REMEDIATED.inc()
    return f


def _counted(report: SweepReport, found: Iterable[Found] = ()) -> None:
    """The page's drift and errors counted in the metrics, once its record committed: a page whose
    record failed is read again by the segment sent again (_keep_running drops them uncounted), and
    its second reading counted them again. Remediations recorded with their requests were counted
    once sent (_sent). A dry run counts nothing: it records and changes nothing, and the counters are
    the fleet's sweeps' (an operator's preview, in a shell where PROMETHEUS_MULTIPROC_DIR is set,
    joined the fleet's totals as drift found again); what it found is its report."""
    if not report.dry_run:
        for f in found:
            if f.recorded:
                continue
            metrics.DRIFT_FOUND.labels("true" if f.action in IN_STAGE_ACTIONS else "false").inc()
            if f.remediated:
                metrics.DRIFT_REMEDIATED.inc()
        for e in report.unrecorded:
            metrics.SWEEP_ERRORS.labels(e.kind).inc()
    report.unrecorded.clear()


# The stage visit, with the rollout row held shared until the errors commit: a stage change (which
# holds it for update) either waits for them and marks them before_stage, or went first, and its
# visit is then no longer the one the page worked at: by its revision, not the stage's name, as a
# stage left and come back to (10% -> 25% -> 10%) has the same name on another visit.
STAGE_SHARED = "SELECT stage, stage_revision FROM rollout_state WHERE id = 1 FOR SHARE"


def _record_errors(conn: Connection, report: SweepReport, now: datetime) -> None:
    """The page's errors; those of a page that worked at a stage left since are that stage's
    (before_stage): a sweep running across a stage change brings none into the new stage's health."""
    if not report.unrecorded:
        return
    now_at = conn.exec_driver_sql(STAGE_SHARED).one()
    before_stage = (now_at.stage, now_at.stage_revision) != (report.stage, report.stage_revision)
    conn.exec_driver_sql(
        "INSERT INTO sweep_error (sweep_id, account_id, kind, failure_class, at, before_stage) VALUES (%(sweep)s, "
        "%(account)s, %(kind)s, %(class)s, %(now)s, %(before)s) ON CONFLICT DO NOTHING",
        [{"sweep": report.run_id, "account": e.account_id, "kind": e.kind, "class": e.failure_class, "now": now,
          "before": before_stage} for e in report.unrecorded],
    )


__all__ = ["RETRIED", "UNCHAINED", "SweepBusy", "SweepReport", "SweepRetry", "Sweeper", "leave_for_beat",
           "retry_within"]
