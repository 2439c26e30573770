"""The sweep's batch read: the accounts in ranges of about ``batch``, with their snapshots.

Each range is read in one REPEATABLE READ transaction (where it ends, its accounts with their
stored state, then every other table once for the range: gather_batch.py), so a range is one
consistent view and gives exactly the snapshots recompute's own gather_many gives, and, in that
same view, which of its accounts already await a recompute (gather_batch.Pending).

``PageReader`` reads ranges on threads of their own (``readers``, one connection each), at most
``depth`` ranges ahead of the sweep. A range ends where the one after it starts, so a reader claims
the next range (one index-only query for its end, under a lock) and reads it while another reader
reads the one before: PostgreSQL answers for two ranges at a time instead of the sweep waiting on
one (at 1,000,000 accounts one reader was the sweep's bottleneck: ~11 µs of database time per
account against ~9 µs of Python). The ranges are handed to the sweep in order, whichever is read
first. The threads only fetch rows; the snapshots are built by the sweep's thread (Python work
holds the GIL wherever it runs), and psycopg2 lets go of the GIL while it waits on PostgreSQL.
Memory stays flat: at most ``depth`` ranges exist at a time, plus the one being built.

When an answer arrives a reader needs the GIL back, and the sweep's thread, busy computing, gives
it up only every ``sys.getswitchinterval()`` (5 ms by default): each round trip could wait that
long, and PostgreSQL sat idle meanwhile (the sweep ran at ~21,000 accounts/s with 5 ms, ~33,000
with 1 ms on 100,000 generated accounts). So while a reader runs the interval is 1 ms, and the
previous one is restored afterwards; the isolation level goes with the BEGIN (no round trip of
its own).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from sqlalchemy import Connection, Engine

from app.domain.snapshot import Snapshot
from app.recompute.gather_batch import Pending, build_pending, build_snapshots, gather_page, range_end, read_range

# Several statements per page: one MVCC snapshot for all of them (psycopg2 sends the level with its
# BEGIN). JIT is off for every connection of ours (app/db.py).
CONSISTENT = {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
SWITCH_INTERVAL = 0.001  # seconds; see the module's docstring

log = logging.getLogger(__name__)

Page = tuple[list[str], dict[str, tuple[Snapshot, int]]]
# A range of the walk: (ids in order, {id: (snapshot, stored version)}, where it ends, the recomputes on
# their way for its accounts).
Range = tuple[list[str], dict[str, tuple[Snapshot, int]], str | None, Pending]


def read_batch(conn: Connection, last: str, batch: int) -> Page:
    """-> (account ids of the page in order, {id: (snapshot, stored version)})."""
    return gather_page(conn, last, batch)


# The DETAILS columns the snapshots are built from (gather_batch.build_snapshots), each a list of
# rows that start with their account id; the ones after them are the pending recomputes.
SNAPSHOT_COLUMNS = 11


def build_page(accounts: list[Any], details: Any) -> dict[str, tuple[Snapshot, int]]:
    """The page's snapshots. An account whose rows cannot be built into one (a stored state edited by
    hand into a shape no recompute writes: a reason without its rule) is left out and logged, not
    the whole page: the sweep counts it as an error of that account, as a compute failure, and walks
    on. Raised, it failed every sweep at the same page, and no account after it was ever compared."""
    try:
        return build_snapshots(accounts, details)
    except Exception:  # the rare page: built again account by account, to find the one at fault
        log.warning("drift sweep: a page from account %s could not be built whole; building it account by "
                    "account", accounts[0][0] if accounts else "-")
    per_account: dict[str, list[list[Any]]] = {}
    for column in range(SNAPSHOT_COLUMNS):
        for row in details[column] or ():
            per_account.setdefault(row[0], [[] for _ in range(SNAPSHOT_COLUMNS)])[column].append(row)
    out: dict[str, tuple[Snapshot, int]] = {}
    for account in accounts:
        own = per_account.get(account[0]) or [[] for _ in range(SNAPSHOT_COLUMNS)]
        try:
            out.update(build_snapshots([account], own))
        except Exception:
            log.exception("drift sweep: the rows of account %s cannot be built into a snapshot", account[0])
    return out


@dataclass
class _Range:
    number: int
    after: str
    upto: str | None  # None: the last range, every account after ``after``


class PageReader:
    """Iterate the pages of the accounts after ``cursor``, in id order, each as (ids, {id: (snapshot,
    stored version)}, upto, pending): ``upto`` is where the page's range ends (None for the last
    one), which is where a later walk resumes even when the range held no account any more;
    ``pending``, the recomputes already on their way for its accounts, read in the same snapshot.
    Use as a context manager: leaving it early stops the threads."""

    def __init__(self, engine: Engine, cursor: str, batch: int, depth: int = 3, readers: int = 2) -> None:
        self.engine = engine
        self.batch = batch
        self.readers = [threading.Thread(target=self._run, name=f"sweep-page-reader-{n}", daemon=True)
                        for n in range(readers)]
        self.stop = threading.Event()
        self.room = threading.Semaphore(depth)  # ranges claimed and not yet handed over
        self.claim_lock = threading.Lock()
        self.next_range: _Range | None = _Range(0, cursor, None)  # upto filled in by the claim
        self.done: dict[int, tuple[str, Any]] = {}  # range number -> ("page", ...) | ("error", exc)
        self.arrived = threading.Condition()
        self.switch_interval = sys.getswitchinterval()
        self.waited = 0.0  # seconds the consumer waited for a page (the database was the bottleneck)

    def __enter__(self) -> PageReader:
        sys.setswitchinterval(min(self.switch_interval, SWITCH_INTERVAL))
        for thread in self.readers:
            thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop.set()
        for thread in self.readers:
            thread.join()
        sys.setswitchinterval(self.switch_interval)

    def __iter__(self) -> Iterator[Range]:
        number = 0
        while True:
            t0 = time.perf_counter()
            with self.arrived:
                while number not in self.done:
                    self.arrived.wait()
                kind, value = self.done.pop(number)
            self.room.release()
            self.waited += time.perf_counter() - t0
            if kind == "error":
                raise value
            upto, accounts, details = value
            # Building the objects needs the GIL: done here, while the readers wait on PostgreSQL.
            yield [r[0] for r in accounts], build_page(accounts, details), upto, build_pending(details)
            if upto is None:
                return
            number += 1

    def _hand_over(self, number: int, item: tuple[str, Any]) -> None:
        with self.arrived:
            self.done[number] = item
            self.arrived.notify()

    def _claim(self, conn: Connection) -> _Range | None:
        """The next range, its end found in ``conn``'s new transaction (so before the range is read)."""
        with self.claim_lock:
            claimed = self.next_range
            if claimed is None:
                return None
            claimed.upto = range_end(conn, claimed.after, self.batch)
            self.next_range = None if claimed.upto is None else _Range(claimed.number + 1, claimed.upto, None)
            return claimed

    def _run(self) -> None:
        claimed: _Range | None = None
        try:
            with self.engine.connect() as conn:
                conn.execution_options(**CONSISTENT)
                while True:
                    while not self.room.acquire(timeout=0.1):
                        if self.stop.is_set():
                            return
                    claimed = None if self.stop.is_set() else self._claim(conn)
                    if claimed is None:
                        return
                    accounts, details = read_range(conn, claimed.after, claimed.upto)
                    conn.rollback()
                    self._hand_over(claimed.number, ("page", (claimed.upto, accounts, details)))
                    claimed = None
        except BaseException as exc:  # handed to the sweep, which raises it where the range was due
            with self.claim_lock:
                if claimed is None:  # failed finding where the next range ends
                    claimed = self.next_range
                self.next_range = None  # no reader claims more
            if claimed is not None:  # else the walk was over, or another reader's error is the one due
                self._hand_over(claimed.number, ("error", exc))
