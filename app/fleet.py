"""The fleet of `dunning run`: the Procfile's processes under honcho, stopped at whatever point a
signal lands, and what a run killed outright left behind (app/launcher.py runs the steps).

Every process is the leader of its own process group; the fleet file in the data folder records the
launcher, the groups and honcho's output helpers, so that the next run stops what a launcher killed
outright (SIGKILL) left running, and never a process that merely got the same pid since.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import multiprocessing
import os
import queue
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from honcho.manager import Manager

KILL_WAIT = 5.0  # seconds from the stop to SIGKILL for what has not exited (honcho's)
# Ctrl-C, SIGTERM and a closed terminal or dropped SSH session (SIGHUP) all stop the fleet.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
FLEET_FILE = "fleet.pid"  # this launcher and the process groups of its fleet
LOCK_FILE = "run.lock"  # locked by the launcher that uses the data folder, for as long as it runs
READY_TIMEOUT = 120.0
WATCH_INTERVAL = 0.5  # seconds between two looks at what the fleet needs beside its programs


class LaunchError(Exception):
    """The fleet cannot start; the message says why and what to change."""


def say(message: str) -> None:
    print(f"dunning run | {message}", flush=True)


# --- the fleet -------------------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived before the fleet was running."""


def still_stopping(signum: int, frame: FrameType | None) -> None:
    # A signal that lands while the main thread is inside a print makes this print a nested write
    # to the same stream, which Python refuses (RuntimeError): then this line is lost, not the stop.
    with contextlib.suppress(RuntimeError):
        say("still stopping; please wait")


@contextlib.contextmanager
def signal_handlers(handler: Any) -> Iterator[None]:
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


MAKE_WATCH_INTERVAL = 0.25  # seconds between two looks at make (MakeWatch)
MAKE_NAMES = ("make", "gmake")


def _caught_signals(pid: int) -> set[int] | None:
    """The signals process ``pid`` has a handler for (Linux: SigCgt in /proc/PID/status); None
    when that cannot be read."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            try:
                mask = int(line.split()[1], 16)
            except (IndexError, ValueError):
                return None
            return {number for number in range(1, 65) if mask >> (number - 1) & 1}
    return None


class MakeWatch:
    """Under `make run` the launcher is GNU make's child. make passes a SIGTERM sent to its own pid on
    to its children, but not a SIGINT or SIGHUP (a terminal sends those to the whole process group,
    the launcher included): it sets the signal back to its default and waits for its children to
    end, for ever, the fleet running on. Nothing tells the launcher either when make is killed
    outright (SIGKILL): the fleet ran on under pid 1. So the launcher watches make: make gone, or no
    longer catching a stop signal it caught (Linux), is that stop."""

    def __init__(self, pid: int, caught: set[int]) -> None:
        self.pid = pid
        self.caught = [sig for sig in STOP_SIGNALS if sig in caught]

    @classmethod
    def of_parent(cls) -> MakeWatch | None:
        """The watch of this process's parent when it is make, else None (a shell, a supervisor:
        those pass their signals on, and a parent that ends is no stop: ``nohup dunning run &``)."""
        import psutil

        pid = os.getppid()
        try:
            if psutil.Process(pid).name() not in MAKE_NAMES:
                return None
        except psutil.Error:
            return None
        return cls(pid, _caught_signals(pid) or set())

    def stopping(self) -> tuple[signal.Signals, str] | None:
        """The stop signal make's state stands for, and why; None while make runs on."""
        if os.getppid() != self.pid:
            return signal.SIGTERM, f"make (pid {self.pid}) is gone"
        caught = _caught_signals(self.pid)
        if caught is not None:
            for sig in self.caught:
                if sig not in caught:
                    return sig, f"make (pid {self.pid}) got {sig.name}, which it does not pass on"
        return None


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


class ReadyWatcher(threading.Thread):
    """Prints once the web app and Flower answer (or warns when they do not in time)."""

    def __init__(self, checks: dict[str, str]) -> None:
        super().__init__(name="dunning-ready", daemon=True)
        self.checks = checks
        self.stopped = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        pending = dict(self.checks)
        while pending and not self.stopped.is_set():
            for name, url in list(pending.items()):
                if _answers(url):
                    del pending[name]
            if not pending:
                say("ready: " + ", ".join(f"{n} {u}" for n, u in self.checks.items()))
                return
            if time.monotonic() > deadline:
                say("not answering yet after {:.0f} s: {}".format(READY_TIMEOUT, ", ".join(pending)))
                return
            self.stopped.wait(0.25)


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    pass


def _helper_main(process: Any, events: Any) -> None:
    """One of honcho's helpers (a process per program: starts it, relays its output). Ctrl-C and a
    closed terminal's SIGHUP reach the whole foreground process group, the helpers included, and a
    helper that dies never reports that its program stopped: it must outlive them. Forked with
    the stop signals blocked, it answers them with a handler that does nothing (a handler, not
    SIG_IGN: its program gets the default dispositions back at exec), then unblocks them."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _ignore_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    process.run(events, True)


class FleetManager(Manager):
    """honcho's Manager, with its stop made dependable, plus the readiness watcher and the fleet's
    pid file (both started after the helpers are forked: no thread runs while it forks).

    - Ctrl-C, SIGTERM and SIGHUP stop the fleet. One that lands before a program has reported its
      pid (honcho read ``p['pid']`` of every program: KeyError, and its stop was never retried)
      stops that program as soon as it reports it.
    - The signal handler only signals processes; what it has to say is printed by the loop (a
      print from a handler that lands inside a print is refused).
    - A second signal while stopping kills what is still running; anything still running
      ``KILL_WAIT`` seconds after the stop began is killed too.
    - A helper that dies without reporting its program's end counts as stopped (the loop would
      otherwise wait for it for ever); its program's process group is killed afterwards.
    - What the programs need beside them (the private servers) ending stops the fleet too, as a
      program exiting does: the programs would otherwise run on against a server that is gone.
    """

    def __init__(self, watcher: ReadyWatcher | None, fleet_file: Path) -> None:
        super().__init__()
        self.watcher = watcher
        self.fleet_file = fleet_file
        self.stop_signal: str | None = None  # the name of the signal that stopped the fleet
        self._forced = False
        self._stopping_since: float | None = None
        self._unsignalled: set[str] = set()  # told to stop before they reported their pid
        self._notes: list[str] = []  # what the signal handler has to say
        self._seen_dead: set[str] = set()
        self.ended: str | None = None  # what ``needed`` reported ended, when that stopped the fleet
        self._relayed = False  # stopping for make's signal (MakeWatch), which may reach us too

    def loop(self, stopped_before: Callable[[], str | None] = lambda: None,
             needed: Callable[[], tuple[str, int] | None] = lambda: None) -> None:
        """Start the programs; return once every one has stopped. ``stopped_before`` names a
        stop signal that came before this loop's handlers were in place: then nothing starts.
        ``needed`` says what the programs need that has ended (and its status, as honcho gives a
        program's), or None while it all runs: then the fleet is stopped."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        self.stop_signal = self.stop_signal or stopped_before()
        if self.stop_signal is not None:
            return
        self._start()
        done = False
        next_look = time.monotonic()
        while True:
            # A relayed stop (relay_stop: make's state showed a signal it does not pass on) absorbs the
            # terminal's Ctrl-C that reached this process too, and no later one: that one was sent to the
            # group at once, before make's state could show it, so it was handled by now (Python runs a
            # pending handler at once, SIGINT's before SIGALRM's). Left set, a signal to make's pid alone
            # (no duplicate) made the user's next Ctrl-C, meant to kill what does not stop, do nothing.
            self._relayed = False
            self._say_notes()
            try:
                msg = self.events.get(timeout=0.1)
            except queue.Empty:
                if done:
                    break
                self._count_silent_helpers()
            else:
                self._handle(msg)
            if self._stopping_since is None and time.monotonic() >= next_look:
                next_look = time.monotonic() + WATCH_INTERVAL
                self._look_at(needed)
            if self._all_started() and self._all_stopped():
                done = True
            elif self._any_stopped():
                self.terminate()  # one program exited: stop the others (honcho's rule)
            if (self._stopping_since is not None and not self._forced
                    and time.monotonic() - self._stopping_since > KILL_WAIT):
                self.kill()
        self._say_notes()

    def relay_stop(self, signum: int, why: str) -> None:
        """Stop as for ``signum``, which make got and did not pass on (MakeWatch); nothing when the
        fleet is stopping already."""
        if self.stop_signal is not None:
            return
        self._notes.append(why)
        self._on_signal(signum, None, relayed=True)

    def _on_signal(self, signum: int, frame: FrameType | None, relayed: bool = False) -> None:
        name = signal.Signals(signum).name
        try:
            if self.stop_signal is None:
                self.stop_signal = name
                self.returncode = 128 + signum
                self._relayed = relayed
                if not relayed:
                    self._notes.append(f"{name} received")
                self.terminate()
            elif self._relayed:
                # The terminal's Ctrl-C reaches make and this process at once: the one stop, not a
                # second signal that kills the fleet.
                self._relayed = False
                self._notes.append(f"{name} received")
            else:
                self._notes.append(f"{name} received again: killing what is still running")
                self.kill()
        except Exception as exc:  # an error here must not end the loop with the fleet running
            self._notes.append(f"{name}: could not signal every process ({exc!r}); stopping anyway")

    def _handle(self, msg: Any) -> None:
        if msg.type == "line":
            self._printer.write(msg)
            return
        p = self._processes[msg.name]
        if msg.type == "start":
            p["pid"] = msg.data["pid"]
            self._system_print(f"{msg.name} started (pid={p['pid']})\n")
            if msg.name in self._unsignalled:  # the stop came first
                self._unsignalled.discard(msg.name)
                self._signal(msg.name, p["pid"])
        elif msg.type == "stop":
            p["returncode"] = msg.data["returncode"]
            self._system_print(f"{msg.name} stopped (rc={p['returncode']})\n")
            if self.returncode is None:
                self.returncode = p["returncode"]

    def _look_at(self, needed: Callable[[], tuple[str, int] | None]) -> None:
        found = needed()
        if found is None:
            return
        self.ended, code = found
        self._system_print(f"{self.ended}: stopping the fleet\n")
        if self.returncode is None:
            self.returncode = code
        self.terminate()

    def _killall(self, force: bool = False) -> None:
        self._forced = self._forced or force
        if self._stopping_since is None:
            self._stopping_since = time.monotonic()
        for name, p in self._processes.items():
            if "returncode" in p:
                continue
            if p.get("pid") is None:
                if name not in self._unsignalled:
                    self._unsignalled.add(name)
                    self._notes.append(f"{name} is starting: it is stopped once it has started")
                continue
            self._signal(name, p["pid"])

    def _signal(self, name: str, pid: int) -> None:
        signame = "SIGKILL" if self._forced else "SIGTERM"
        self._notes.append(f"sending {signame} to {name} (pid {pid})")
        if self._forced:
            self._procmgr.kill(pid)
        else:
            self._procmgr.terminate(pid)

    def _say_notes(self) -> None:
        while self._notes:
            self._system_print(self._notes.pop(0) + "\n")

    def _all_started(self) -> bool:
        return all(p.get("pid") is not None or "returncode" in p for p in self._processes.values())

    def _count_silent_helpers(self) -> None:
        """Called when the queue is empty. A helper seen dead on an earlier such call has had every
        message it sent read since (it flushes them before it exits)."""
        for name, p in self._processes.items():
            helper = p.get("process")
            if helper is None or "returncode" in p or helper.is_alive():
                continue
            if name not in self._seen_dead:
                self._seen_dead.add(name)
                continue
            p["returncode"] = helper.exitcode if helper.exitcode else 1  # a failure: not 0, no signal
            self._unsignalled.discard(name)
            self._system_print(f"{name}: its output helper exited (rc={helper.exitcode}) without "
                               "reporting the program's end; counted as stopped\n")
            if self.returncode is None:
                self.returncode = p["returncode"]

    def _start(self) -> None:
        # Forked with the stop signals blocked, a helper cannot die of one before it is immune
        # (_helper_main); here they are delivered as soon as the helpers are forked.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for name, p in self._processes.items():
                p["process"] = multiprocessing.Process(
                    name=name, target=_helper_main, args=(p["obj"], self.events))
                p["process"].start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        threading.Thread(target=self._record_groups, name="dunning-fleet-pids", daemon=True).start()
        if self.watcher is not None:
            self.watcher.start()

    def child_pids(self) -> list[int]:
        return [p["pid"] for p in list(self._processes.values()) if p.get("pid")]

    def _record_groups(self) -> None:
        from app.embedded import create_time, owner_record, poll_until, write_pidfile

        # The "started" events arrive on honcho's queue, which the main thread reads.
        poll_until(lambda: len(self.child_pids()) >= len(self._processes), 30)

        groups = [[pid, create_time(pid)] for pid in self.child_pids()]
        # honcho's helpers (one per program, in this launcher's own process group): if this launcher
        # is killed outright they block for ever on its full output queue, so the next run stops them.
        helpers = [[pid, create_time(pid)] for pid in self.helper_pids()]
        with contextlib.suppress(OSError):
            write_pidfile(self.fleet_file, {**owner_record(), "groups": groups, "helpers": helpers})

    def helper_pids(self) -> list[int]:
        return [p["process"].pid for p in list(self._processes.values())
                if p.get("process") is not None and p["process"].pid]


def kill_leftover_groups(pids: list[int]) -> None:
    """honcho runs each process as the leader of its own process group and waits for the leader
    only; make sure nothing else of those groups (a worker's pool child...) outlives it."""
    from app.embedded import poll_until

    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pgid in pids:
            try:
                os.killpg(pgid, sig)
                alive.append(pgid)
            except (ProcessLookupError, PermissionError):
                pass

        def all_gone() -> bool:
            nonlocal alive
            alive = [g for g in alive if _group_exists(g)]
            return not alive

        poll_until(all_gone, 3)
        pids = alive


def claim_data_dir(data_dir: Path) -> bool:
    """Refuse a data folder another live launcher uses; stop what a dead one left running (its
    fleet, honcho's helpers, the private servers). True when there was something to stop."""
    from app.embedded import (
        EmbeddedPostgres,
        EmbeddedRedis,
        live_process,
        owner_record,
        poll_until,
        read_pidfile,
        write_pidfile,
    )

    path = data_dir / FLEET_FILE
    _lock_data_dir(data_dir)
    record = read_pidfile(path)
    owner = record.get("owner_pid")
    if owner and owner != os.getpid() and live_process(owner, record.get("owner_started")):
        raise LaunchError(_in_use(data_dir, owner))
    # The helpers first: blocked writing to the dead launcher's full queue, they no longer read
    # their programs' output, so a program stopping may block writing its last lines (Flower's
    # threads then keep its port after its main thread is gone). The very processes recorded,
    # not pids handed out again since.
    recorded = _recorded(record.get("helpers"))
    helpers = [pid for pid, started in recorded if live_process(pid, started)]
    if helpers:
        say(f"stopping the previous run's output helpers left behind (pids {helpers})")
        for pid in helpers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)  # blocked writing to a pipe nobody reads: SIGTERM waits
        poll_until(lambda: not any(live_process(pid, started) for pid, started in recorded), 3)
    leftovers = []
    for pgid, started in _recorded(record.get("groups")):
        if not _group_exists(pgid):
            continue
        # A pid is never handed out while a process group of that number exists, so a live
        # group whose leader is gone is still ours; a leader still there (alive, or a zombie
        # nobody reaped yet) must be the one we recorded.
        if _process_exists(pgid) and not _recorded_process(pgid, started):
            continue
        leftovers.append(pgid)
    if leftovers:
        say(f"stopping processes a previous run left behind (process groups {leftovers})")
        kill_leftover_groups(leftovers)
    # Then the private servers a launcher killed outright left running (their starter is gone;
    # one another live process started is left alone). Stopped now, not when this run starts its
    # own: this run may end before that (a port in use), and must not leave them behind.
    EmbeddedPostgres(data_dir).stop_leftover()
    EmbeddedRedis(data_dir).stop_leftover()
    write_pidfile(path, {**owner_record(), "groups": []})
    return bool(helpers or leftovers)


def _in_use(data_dir: Path, owner: Any) -> str:
    who = f" (pid {owner})" if owner else ""
    return (f"another `dunning run`{who} uses the data folder {data_dir}; stop it first or choose another "
            "folder with --data-dir")


_held_locks: dict[Path, int] = {}  # data folder lock file -> its descriptor, held by this process


def _lock_data_dir(data_dir: Path) -> None:
    """Hold the data folder's lock, or refuse it. The fleet file alone let two launchers started
    together both find the folder free (each read it before the other wrote it), and run two fleets
    on it. A POSIX record lock: the kernel drops it when its process ends, however it ends (SIGKILL
    too), and a forked child (honcho's helpers, which a launcher killed outright leaves behind) does
    not inherit it. Only one descriptor per file: closing any would release it."""
    from app.embedded import live_process, read_pidfile

    path = data_dir / LOCK_FILE
    if path in _held_locks:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        record = read_pidfile(data_dir / FLEET_FILE)  # who, once it has said so
        owner = record.get("owner_pid")
        live = live_process(owner, record.get("owner_started"))
        raise LaunchError(_in_use(data_dir, owner if live else None)) from None
    _held_locks[path] = fd


def _unlock_data_dir(data_dir: Path) -> None:
    fd = _held_locks.pop(data_dir / LOCK_FILE, None)
    if fd is not None:
        os.close(fd)


def _recorded(items: Any) -> list[tuple[int, Any]]:
    """The (pid, start time) pairs of a fleet file's list; a malformed entry is skipped."""
    pairs = []
    for item in items or []:
        try:
            pairs.append((int(item[0]), item[1]))
        except (TypeError, ValueError, IndexError):
            continue
    return pairs


def release_data_dir(data_dir: Path) -> None:
    from app.embedded import read_pidfile

    path = data_dir / FLEET_FILE
    if read_pidfile(path).get("owner_pid") == os.getpid():
        # A disk remounted read-only meanwhile keeps the file: the next run finds its owner gone.
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
    _unlock_data_dir(data_dir)


def _recorded_process(pid: int, started: Any) -> bool:
    """Whether ``pid`` is still the process recorded with start time ``started``."""
    from app.embedded import create_time

    now = create_time(pid)
    if now is None:
        return False
    return not isinstance(started, (int, float)) or abs(now - started) <= 1.0


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # Zombies still count for killpg; they are gone for our purpose once reaped by their parent,
    # unless a zombie leader's other threads still run (they hold its sockets, its port).
    try:
        import psutil

        for proc in psutil.process_iter():
            if _pgid(proc.pid) != pgid:
                continue
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.status() != psutil.STATUS_ZOMBIE or _leader_exiting(proc.pid):
                    return True
        return False
    except Exception:
        return True


def _leader_exiting(pid: int) -> bool:
    """A zombie thread-group leader whose other threads have not all exited yet (Linux)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        state = stat.rpartition(")")[2].split()[:1]
        if state and state[0] not in ("Z", "X"):
            return True
    return False


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
