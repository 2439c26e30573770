"""Group commit: the requests of one web process that are waiting at the same moment share one
flush (one statement, one commit, one broker round trip) instead of paying for one each.

Leader and followers, with no thread of its own: a request puts its item in the queue; if no
flush is running it becomes the leader, takes everything queued (up to ``max_batch``), flushes it
and hands each waiting request its result; otherwise it sleeps until it is handed its result or
the lead. Under no load a batch is the one request itself, flushed at once: no timer, no waiting
for company. Under load, the requests that arrive while one flush runs form the next batch, so the
batch grows with the load and the cost per request falls.

Requests are threads or, under gunicorn's gevent workers (the Procfile's), greenlets: once gevent
has patched the process, the locks below are gevent's.

Each waiting request sleeps on a lock of its own and is woken once, when its result is ready or
when it is to lead the next flush: no condition variable waking every waiter after each flush.

A request can end while it waits or leads: under gevent its greenlet is killed (``GreenletExit``) or
a ``gevent.Timeout`` fires in it. The lead then passes on all the same, and the other requests of a
batch its leader ended in the middle of are answered ``interrupted()`` (whether their items were
flushed is not known). Otherwise the group stayed busy with no leader, and every request of the
process after it waited for ever.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# flush(items) -> one result per item, in order: a value, or the exception that item's request raises.
Flush = Callable[[list[T]], Sequence["R | BaseException"]]


class FlushInterrupted(Exception):
    """The request leading a flush ended in the middle of it: this item may or may not be flushed."""


class _Slot(Generic[T, R]):
    __slots__ = ("done", "handed", "item", "outcome", "wake")

    def __init__(self, item: T) -> None:
        self.item = item
        self.done = False
        self.handed = False  # woken to lead the next flush
        self.outcome: R | BaseException | None = None
        self.wake = threading.Lock()
        self.wake.acquire()  # released once: result ready, or lead the next flush


class GroupCommit(Generic[T, R]):
    def __init__(self, flush: Flush[T, R], max_batch: int = 64,
                 interrupted: Callable[[], BaseException] = FlushInterrupted) -> None:
        self.flush = flush
        self.max_batch = max_batch
        self.interrupted = interrupted  # what the others of a batch raise when its leader ended mid-flush
        self.lock = threading.Lock()
        self.queue: list[_Slot[T, R]] = []
        self.busy = False  # a leader is flushing, or has been chosen

    def submit(self, item: T) -> R:
        """Flush ``item`` with whatever else is waiting; its result, or raise its exception."""
        slot: _Slot[T, R] = _Slot(item)
        with self.lock:
            self.queue.append(slot)
            lead = not self.busy
            self.busy = True
        if not lead:
            try:
                slot.wake.acquire()  # woken once: with the result, or to lead
            except BaseException:  # this request ended while it waited (gevent: killed, a Timeout)
                self._leave(slot)
                raise
        if not slot.done:
            self._lead(slot)
        if isinstance(slot.outcome, BaseException):
            raise slot.outcome
        return slot.outcome  # type: ignore[return-value]

    def _lead(self, own: _Slot[T, R]) -> None:
        """Flush the oldest waiting items until ``own`` is done (it is in the first batch unless more
        than a batch arrived before it), waking each other request of a batch with its result; then
        pass the lead to the oldest request still waiting, if any: also when this request ends while
        it leads (gevent: its greenlet killed, a Timeout), or no one would ever lead again."""
        try:
            while not own.done:
                # Yield once before taking the batch: under gevent (the Procfile's web workers; time.sleep
                # is gevent's there) the requests of this worker that are ready to run, read and being
                # verified, reach the queue and join this flush instead of waiting for the next. It adds
                # no timer and no wait when nothing else is ready. Under threads it lets go of the GIL.
                time.sleep(0)
                with self.lock:
                    batch, self.queue = self.queue[:self.max_batch], self.queue[self.max_batch:]
                try:
                    outcomes = self._run(batch)
                except BaseException:  # this request ended mid-flush: the others of its batch are answered
                    for each in batch:
                        if each is not own:
                            each.outcome, each.done = self.interrupted(), True
                            each.wake.release()
                    raise
                for each, outcome in zip(batch, outcomes, strict=True):
                    each.outcome, each.done = outcome, True
                for each in batch:
                    if each is not own:
                        each.wake.release()
        finally:
            with self.lock:
                if not own.done and own in self.queue:  # ended before its batch was taken: not flushed
                    self.queue.remove(own)
                successor = self._hand_on()
            if successor is not None:
                successor.wake.release()

    def _leave(self, slot: _Slot[T, R]) -> None:
        """A waiting request that ended: its item is not flushed unless a batch has taken it already,
        and a lead handed to it passes on."""
        with self.lock:
            if slot in self.queue:
                self.queue.remove(slot)
            successor = self._hand_on() if slot.handed and not slot.done else None
        if successor is not None:
            successor.wake.release()

    def _hand_on(self) -> _Slot[T, R] | None:
        """Under the lock: the oldest waiting request, which is to lead the next flush (to be woken
        once the lock is let go), or None, and the group is idle."""
        successor = self.queue[0] if self.queue else None
        self.busy = successor is not None
        if successor is not None:
            successor.handed = True
        return successor

    def _run(self, batch: list[_Slot[T, R]]) -> Sequence[R | BaseException]:
        try:
            outcomes = self.flush([slot.item for slot in batch])
        except Exception as exc:  # the whole flush failed: every request in it fails the same way
            return [exc] * len(batch)
        if len(outcomes) != len(batch):
            return [RuntimeError("group commit: flush returned a wrong number of results")] * len(batch)
        return outcomes
