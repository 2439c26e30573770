"""The sweep's batch read: keyset pages of accounts and their snapshots.

Each page is two statements (gather_batch.gather_page: the page with its stored state, then every
other table once for the whole page) in one REPEATABLE READ transaction, so the page is one
consistent view, and gives exactly the snapshots recompute's own gather_many gives.

``PageReader`` runs the statements on a thread of its own, at most ``depth`` pages ahead of the
sweep: while the sweep computes one page, PostgreSQL (another process, another core) is already
answering for the next one, and psycopg2 lets go of the GIL while it waits. The thread only fetches
rows; the snapshots are built by the sweep's thread (Python work holds the GIL wherever it runs).
Memory stays flat: at most ``depth`` + 2 pages exist at a time.

When an answer arrives the thread needs the GIL back, and the sweep's thread, busy computing, gives
it up only every ``sys.getswitchinterval()`` (5 ms by default): three round trips a page could each
wait that long, and PostgreSQL sat idle meanwhile (the sweep ran at ~21,000 accounts/s with 5 ms,
~33,000 with 1 ms on 100,000 generated accounts). So while a reader runs the interval is 1 ms, and
the previous one is restored afterwards; the isolation level goes with the BEGIN (no round trip
of its own).
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from sqlalchemy import Connection, Engine

from app.domain.snapshot import Snapshot
from app.recompute.gather_batch import build_snapshots, gather_page, read_page

# Several statements per page: one MVCC snapshot for all of them (psycopg2 sends the level with its
# BEGIN). JIT is off for every connection of ours (app/db.py).
CONSISTENT = {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
SWITCH_INTERVAL = 0.001  # seconds; see the module's docstring

Page = tuple[list[str], dict[str, tuple[Snapshot, int]]]


def read_batch(conn: Connection, last: str, batch: int) -> Page:
    """-> (account ids of the page in order, {id: (snapshot, stored version)})."""
    return gather_page(conn, last, batch)


class PageReader:
    """Iterate the pages after ``cursor`` (read ahead on a thread); the last one is shorter than
    ``batch`` (possibly empty). Use as a context manager: leaving it early stops the thread."""

    def __init__(self, engine: Engine, cursor: str, batch: int, depth: int = 2) -> None:
        self.engine = engine
        self.cursor = cursor
        self.batch = batch
        self.pages: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sweep-page-reader", daemon=True)
        self.switch_interval = sys.getswitchinterval()
        self.waited = 0.0  # seconds the consumer waited for a page (the database was the bottleneck)

    def __enter__(self) -> PageReader:
        sys.setswitchinterval(min(self.switch_interval, SWITCH_INTERVAL))
        self.thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop.set()
        while self.thread.is_alive():
            with contextlib.suppress(queue.Empty):  # unblock a reader waiting for room in the queue
                self.pages.get(timeout=0.05)
        self.thread.join()
        sys.setswitchinterval(self.switch_interval)

    def __iter__(self) -> Iterator[Page]:
        while True:
            t0 = time.perf_counter()
            kind, value = self.pages.get()
            self.waited += time.perf_counter() - t0
            if kind == "error":
                raise value
            accounts, details = value
            # Building the objects needs the GIL: done here, while the thread waits on PostgreSQL.
            yield [r[0] for r in accounts], build_snapshots(accounts, details)
            if len(accounts) < self.batch:
                return

    def _put(self, item: tuple[str, Any]) -> bool:
        while not self.stop.is_set():
            try:
                self.pages.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        cursor = self.cursor
        try:
            with self.engine.connect() as conn:
                conn.execution_options(**CONSISTENT)
                while not self.stop.is_set():
                    accounts, details = read_page(conn, cursor, self.batch)
                    conn.rollback()
                    if not self._put(("page", (accounts, details))) or len(accounts) < self.batch:
                        return
                    cursor = accounts[-1][0]
        except BaseException as exc:  # handed to the sweep, which raises it
            self._put(("error", exc))
