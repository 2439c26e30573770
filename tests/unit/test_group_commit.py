"""webhooks/group_commit.py: requests waiting together share one flush, each gets its own result."""

from __future__ import annotations

import threading

import pytest

from tests.conftest import wait_for
from webhooks.group_commit import GroupCommit


class Recorder:
    """A flush that records its batches and, when asked, holds the first one until released."""

    def __init__(self, hold_first: bool = False, fail: set[int] | None = None) -> None:
        self.batches: list[list[int]] = []
        self.holding = threading.Event()
        self.release = threading.Event()
        self.hold_first = hold_first
        self.fail = fail or set()

    def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        if self.hold_first and len(self.batches) == 1:
            self.holding.set()
            assert self.release.wait(10)
        return [ValueError(f"item {i}") if i in self.fail else i * 10 for i in items]


def behind_a_held_flush(group: GroupCommit[int, int], flush: Recorder, first: int,
                        others: list[int]) -> dict[int, object]:
    """Submit ``first`` (its flush is held), then ``others`` from threads of their own once it runs;
    release the flush when they are all queued; every request's result or exception."""
    results: dict[int, object] = {}

    def one(i: int) -> None:
        try:
            results[i] = group.submit(i)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(first,))]
    threads[0].start()
    assert flush.holding.wait(10)
    threads += [threading.Thread(target=one, args=(i,)) for i in others]
    for t in threads[1:]:
        t.start()
    wait_for(lambda: len(group.queue) == len(others), message=f"{len(others)} requests queued behind the flush")
    flush.release.set()
    for t in threads:
        t.join(10)
    return results


def test_alone_a_request_is_flushed_at_once_as_a_batch_of_one():
    flush = Recorder()
    group: GroupCommit[int, int] = GroupCommit(flush)
    assert group.submit(7) == 70
    assert group.submit(8) == 80
    assert flush.batches == [[7], [8]]


def test_requests_arriving_during_a_flush_share_the_next_one():
    flush = Recorder(hold_first=True)
    group: GroupCommit[int, int] = GroupCommit(flush)
    results = behind_a_held_flush(group, flush, 1, [2, 3, 4, 5, 6])
    assert flush.batches[0] == [1]
    assert sorted(flush.batches[1]) == [2, 3, 4, 5, 6]  # one flush for all of them
    assert len(flush.batches) == 2
    assert results == {i: i * 10 for i in range(1, 7)}
    assert not group.busy and group.queue == []


def test_batches_are_capped_and_everyone_is_served():
    flush = Recorder(hold_first=True)
    group: GroupCommit[int, int] = GroupCommit(flush, max_batch=2)
    results = behind_a_held_flush(group, flush, 0, [1, 2, 3, 4, 5])
    assert results == {i: i * 10 for i in range(6)}
    assert all(len(batch) <= 2 for batch in flush.batches)
    assert sorted(i for batch in flush.batches for i in batch) == list(range(6))


def test_an_item_that_failed_fails_only_its_own_request():
    flush = Recorder(hold_first=True, fail={3})
    group: GroupCommit[int, int] = GroupCommit(flush)
    results = behind_a_held_flush(group, flush, 1, [2, 3, 4])
    assert results[1] == 10 and results[2] == 20 and results[4] == 40
    assert isinstance(results[3], ValueError) and str(results[3]) == "item 3"


def test_a_flush_that_raises_fails_every_request_in_it_and_the_next_batch_runs():
    calls: list[list[int]] = []

    def flush(items: list[int]) -> list[int | BaseException]:
        calls.append(items)
        if len(calls) == 1:
            raise ConnectionError("database went away")
        return [i for i in items]

    group: GroupCommit[int, int] = GroupCommit(flush)
    with pytest.raises(ConnectionError, match="went away"):
        group.submit(1)
    assert group.submit(2) == 2  # the group is not left busy


GREENLETS = """
from gevent import monkey
monkey.patch_all()
import gevent
from webhooks.group_commit import GroupCommit

batches = []
def flush(items):
    batches.append(len(items))
    return [i * 10 for i in items]

group = GroupCommit(flush)
requests = [gevent.spawn(group.submit, i) for i in range(5)]
gevent.joinall(requests, raise_error=True)
assert [r.value for r in requests] == [0, 10, 20, 30, 40], [r.value for r in requests]
print(batches)
"""


def test_under_gevent_the_requests_ready_to_run_join_the_leaders_batch() -> None:
    """Five greenlets ready at once, as under a gunicorn gevent worker (a patched process of its own):
    the first leads, and its yield before taking the batch lets the other four queue, so one flush
    serves all five (without the yield each would find no other queued and flush alone: [1, 1, 1, 1, 1])."""
    import subprocess
    import sys

    from tests.integration.processes import ROOT

    done = subprocess.run([sys.executable, "-c", GREENLETS], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[5]"]


def _in_a_gevent_process(script: str) -> list[str]:
    """``script`` run in a process gevent has patched, as a gunicorn gevent worker is; its output's
    words. A greenlet left waiting for ever ends the script with gevent's LoopExit."""
    import subprocess
    import sys

    from tests.integration.processes import ROOT

    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


KILLED = """
from gevent import monkey
monkey.patch_all()
import gevent, gevent.event
from webhooks.group_commit import FlushInterrupted, GroupCommit

flushing, release, batches = gevent.event.Event(), gevent.event.Event(), []

def flush(items):
    batches.append(sorted(items))
    if len(batches) == 1:
        flushing.set()
        release.wait()
    return [i * 10 for i in items]

def outcome(greenlet):
    value = greenlet.value
    return type(value).__name__ if isinstance(value, BaseException) else value

def submit(i):
    try:
        return group.submit(i)
    except FlushInterrupted as exc:
        return exc

group = GroupCommit(flush)
"""

# The request next in line to lead ends while it waits (its greenlet killed: a client gone under a
# gevent timeout, a worker's graceful timeout killing its handlers): the one behind it must still
# be served, and so must every later request.
A_WAITING_REQUEST_ENDS = KILLED + """
leader = gevent.spawn(submit, 0)
flushing.wait()
next_in_line, behind = gevent.spawn(submit, 1), gevent.spawn(submit, 2)
gevent.sleep(0)  # both wait behind the held flush
gevent.kill(next_in_line)
release.set()
gevent.joinall([leader, behind])
later = gevent.spawn(submit, 3)
later.join()
print(outcome(leader), outcome(behind), outcome(later), batches)
"""


def test_a_request_that_ends_while_it_waits_leaves_the_others_served() -> None:
    """Before, the lead was handed to the ended request's slot, which nobody woke to: the group stayed
    busy with no leader and every later webhook of that worker waited for ever."""
    assert _in_a_gevent_process(A_WAITING_REQUEST_ENDS) == ["0", "20", "30", "[[0],", "[2],", "[3]]"]


# The leader ends in the middle of its flush: the others of its batch get an answer (not the
# leader's GreenletExit raised in their greenlets, which gunicorn drops without a response), the
# leader's own end goes on (it is not swallowed), and later requests are served.
THE_LEADER_ENDS_MID_FLUSH = KILLED + """
first = [gevent.spawn(submit, i) for i in range(3)]  # the leader's yield lets 1 and 2 join its batch
flushing.wait()
queued = gevent.spawn(submit, 3)
gevent.sleep(0)
gevent.kill(first[0])
gevent.joinall([*first, queued])
later = gevent.spawn(submit, 4)
later.join()
print(*(outcome(g) for g in [*first, queued, later]), first[0].successful(), batches)
"""


def test_a_leader_that_ends_mid_flush_answers_its_batch_and_hands_on_the_lead() -> None:
    words = _in_a_gevent_process(THE_LEADER_ENDS_MID_FLUSH)
    assert words[:5] == ["GreenletExit", "FlushInterrupted", "FlushInterrupted", "30", "40"], words
    assert " ".join(words[6:]) == "[[0, 1, 2], [3], [4]]"


# The leader ends at its yield before taking a batch (a kill or a Timeout delivered there): it is
# not flushed, and the request waiting behind it leads instead. The kill is delivered by the yield
# itself here, as gevent's scheduling puts it there only by chance.
THE_LEADER_ENDS_AT_ITS_YIELD = KILLED + """
import webhooks.group_commit as group_commit

class Yield:  # stands in for the group commit's `time` module: its leader's one yield (a sleep of 0)
    victim = None
    def sleep(self, seconds):
        assert seconds == 0  # a yield, never a timed wait
        gevent.sleep(0)  # the yield as gevent makes it
        if gevent.getcurrent() is self.victim:
            raise gevent.GreenletExit

group_commit.time = clock = Yield()
leader = gevent.spawn(submit, 0)
flushing.wait()
next_in_line, behind = gevent.spawn(submit, 1), gevent.spawn(submit, 2)
gevent.sleep(0)
clock.victim = next_in_line  # handed the lead once the held flush ends, it ends at its yield
release.set()
gevent.joinall([leader, next_in_line, behind])
later = gevent.spawn(submit, 3)
later.join()
print(outcome(leader), outcome(next_in_line), outcome(behind), outcome(later), batches)
"""


def test_a_leader_that_ends_before_taking_its_batch_hands_on_the_lead() -> None:
    assert _in_a_gevent_process(THE_LEADER_ENDS_AT_ITS_YIELD) == [
        "0", "GreenletExit", "20", "30", "[[0],", "[2],", "[3]]"]
