"""`dunning run` (what `make run` does): the whole fleet on one machine.

1. PostgreSQL: ``DATABASE_URL`` if set, else a private server under the data folder (app.embedded).
2. Redis: ``CELERY_BROKER_URL`` if set, else a private server under the data folder.
3. Local credentials: ``STRIPE_WEBHOOK_SECRET``, ``SERVICE_TOKENS``, ``SUPPORT_TOKENS`` and
   ``SECRET_KEY`` when unset are generated once, kept in ``<data>/local-secrets.json`` and printed
   (the generated ones only; nothing the user configured is ever printed).
4. Migrations to head.
5. The Procfile's processes (web, worker, beat, flower) under honcho, with ``PORT``,
   ``FLOWER_PORT`` and ``DUNNING_DATA_DIR`` set.

Ctrl-C (SIGINT) or SIGTERM stops every process of the fleet, then the private servers. A second run
reuses the data folder (database, queued work, beat schedule, local credentials).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, TextIO, cast

from honcho.environ import parse_procfile
from honcho.manager import Manager

from app.config import ConfigError, normalize_database_url

DEFAULT_DATA_DIR = ".dunning"
DEFAULT_PORT = 5000
DEFAULT_FLOWER_PORT = 5555
READY_TIMEOUT = 120.0
SECRETS_FILE = "local-secrets.json"
FLEET_FILE = "fleet.pid"  # this launcher and the process groups of its fleet

# The repository's Procfile is the source of truth; this copy is used when the package is installed
# without it (a wheel). tests/test_launcher.py checks that the two agree.
DEFAULT_PROCFILE = """\
web: export PROMETHEUS_MULTIPROC_DIR="${DUNNING_DATA_DIR:-.dunning}/metrics/web" \
SECRET_KEY="${SECRET_KEY:-$(od -An -N32 -tx1 /dev/urandom | tr -d ' \\n')}" \
&& rm -rf "$PROMETHEUS_MULTIPROC_DIR" && mkdir -p "$PROMETHEUS_MULTIPROC_DIR" \
&& exec gunicorn 'app:create_app()' --bind 0.0.0.0:${PORT:-5000} --workers ${WEB_CONCURRENCY:-2} \
--worker-class gevent --worker-connections ${WEB_CONNECTIONS:-1000} --access-logfile - \
--control-socket "${DUNNING_DATA_DIR:-.dunning}/gunicorn.ctl"
worker: export PROMETHEUS_MULTIPROC_DIR="${DUNNING_DATA_DIR:-.dunning}/metrics/worker" \
WORKER_METRICS_PORT="${WORKER_METRICS_PORT:-9808}" && rm -rf "$PROMETHEUS_MULTIPROC_DIR" \
&& mkdir -p "$PROMETHEUS_MULTIPROC_DIR" && exec celery -A tasks worker -E \
-Q recompute,payments,sweeps,outbox,maintenance --prefetch-multiplier 1 -l info
beat: mkdir -p "${DUNNING_DATA_DIR:-.dunning}" && exec celery -A tasks beat \
--schedule "${DUNNING_DATA_DIR:-.dunning}/celerybeat-schedule" -l info
flower: export FLOWER_UNAUTHENTICATED_API="${FLOWER_UNAUTHENTICATED_API:-true}" \
&& exec celery -A tasks flower --address=${FLOWER_ADDRESS:-127.0.0.1} --port=${FLOWER_PORT:-5555}
"""


class LaunchError(Exception):
    """The fleet cannot start; the message says why and what to change."""


def say(message: str) -> None:
    print(f"dunning run | {message}", flush=True)


class _Output(io.TextIOBase):
    """The launcher's stdout or stderr. When whatever reads it is gone (`make run | tee run.log`,
    and Ctrl-C stopped tee first), the rest of the output is dropped: a BrokenPipeError must not
    end the launcher half-way through stopping the fleet and the private servers."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                self.stream.write(text)
            except OSError:
                self._reader_gone()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except OSError:
                self._reader_gone()

    def isatty(self) -> bool:
        return not self.gone and self.stream.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]  # an attribute in typeshed, read-only here
        return self.stream.encoding

    def fileno(self) -> int:
        return self.stream.fileno()

    def _reader_gone(self) -> None:
        self.gone = True
        # The interpreter flushes the real stream once more at exit: give its descriptor somewhere
        # to write that is always there.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)


# --- configuration ---------------------------------------------------------------------------


def procfile_processes(env: Mapping[str, str]) -> dict[str, str]:
    """Process name -> command, from ``DUNNING_PROCFILE``, the repository's Procfile, or the
    built-in copy."""
    if env.get("DUNNING_PROCFILE"):
        # Named, it is the one: running another Procfile instead would hide the mistake.
        named = Path(env["DUNNING_PROCFILE"])
        if not named.is_file():
            raise LaunchError(f"DUNNING_PROCFILE names {env['DUNNING_PROCFILE']}, which is not a file")
        return dict(parse_procfile(named.read_text()).processes)
    checkout = Path(__file__).resolve().parent.parent / "Procfile"
    if checkout.is_file():
        return dict(parse_procfile(checkout.read_text()).processes)
    return dict(parse_procfile(DEFAULT_PROCFILE).processes)


def programs_path(path: str) -> str:
    """``path`` with this Python's scripts directory first: the Procfile's programs (gunicorn,
    celery) are installed beside ``dunning``, in a virtual environment that need not be active."""
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir in path.split(os.pathsep):
        return path
    return bin_dir + (os.pathsep + path if path else "")


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a port number, got {raw!r}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"{name} must be a port number, got {raw!r}")
    return port


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn and tornado do
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def local_credentials(env: Mapping[str, str], data_dir: Path) -> dict[str, str]:
    """Values for the credentials the environment leaves unset, kept in the data folder so a
    second run (and anything configured with them, e.g. `stripe listen`) keeps working."""
    path = data_dir / SECRETS_FILE
    try:
        stored = json.loads(path.read_text())
        if not isinstance(stored, dict):
            stored = {}
    except (OSError, ValueError):
        stored = {}
    makers: dict[str, Callable[[], str]] = {
        "STRIPE_WEBHOOK_SECRET": lambda: "whsec_local_" + secrets.token_hex(24),
        "SERVICE_TOKENS": lambda: "svc_local_" + secrets.token_urlsafe(24),
        "SUPPORT_TOKENS": lambda: "support:sup_local_" + secrets.token_urlsafe(24),
        "SECRET_KEY": lambda: secrets.token_hex(32),
    }
    chosen: dict[str, str] = {}
    for name, make in makers.items():
        if env.get(name, "").strip():
            continue  # configured by the user: use it, never print it
        value = stored.get(name)
        chosen[name] = value if isinstance(value, str) and value else make()
    if chosen and any(stored.get(k) != v for k, v in chosen.items()):
        merged = {**stored, **chosen}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(merged, fh, indent=2)
            fh.write("\n")
    return chosen


# --- the fleet -------------------------------------------------------------------------------


class _Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived before the fleet was running."""


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def _still_stopping(signum: int, frame: FrameType | None) -> None:
    # A signal that lands while the main thread is inside a print makes this print a nested write
    # to the same stream, which Python refuses (RuntimeError): then this line is lost, not the stop.
    with contextlib.suppress(RuntimeError):
        say("still stopping; please wait")


@contextlib.contextmanager
def _signal_handlers(handler: Any) -> Iterator[None]:
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


class _ReadyWatcher(threading.Thread):
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


class _FleetManager(Manager):
    """honcho's Manager, plus: the readiness watcher and the fleet's pid file, both started after
    honcho forked its helpers (no thread is running while it forks)."""

    def __init__(self, watcher: _ReadyWatcher | None, fleet_file: Path) -> None:
        super().__init__()
        self.watcher = watcher
        self.fleet_file = fleet_file

    def _start(self) -> None:
        super()._start()
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


def _kill_leftover_groups(pids: list[int]) -> None:
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


def claim_data_dir(data_dir: Path) -> None:
    """Refuse a data folder another live launcher uses; stop what a dead one left running."""
    from app.embedded import live_process, owner_record, read_pidfile, write_pidfile

    path = data_dir / FLEET_FILE
    record = read_pidfile(path)
    owner = record.get("owner_pid")
    if owner and owner != os.getpid() and live_process(owner, record.get("owner_started")):
        raise LaunchError(
            f"another `dunning run` (pid {owner}) uses the data folder {data_dir}; stop it first "
            "or choose another folder with --data-dir"
        )
    leftovers = []
    for pgid, started in _recorded(record.get("groups")):
        if not _group_exists(pgid):
            continue
        # A pid is never handed out while a process group of that number exists, so a live
        # group whose leader is gone is still ours; a live leader must be the one we recorded.
        if _process_exists(pgid) and live_process(pgid, started) is None:
            continue
        leftovers.append(pgid)
    if leftovers:
        say(f"stopping processes a previous run left behind (process groups {leftovers})")
        _kill_leftover_groups(leftovers)
    # the very processes recorded, not pids handed out again since
    helpers = [pid for pid, started in _recorded(record.get("helpers")) if live_process(pid, started)]
    if helpers:
        say(f"stopping the previous run's output helpers left behind (pids {helpers})")
        for pid in helpers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)  # blocked writing to a pipe nobody reads: SIGTERM waits
    write_pidfile(path, {**owner_record(), "groups": []})


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
        path.unlink(missing_ok=True)


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
    # Zombies still count for killpg; they are gone for our purpose once reaped by their parent.
    try:
        import psutil

        return any(
            p.status() != psutil.STATUS_ZOMBIE
            for p in psutil.process_iter()
            if _pgid(p.pid) == pgid
        )
    except Exception:
        return True


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


class Launcher:
    def __init__(self, data_dir: Path, env: Mapping[str, str]) -> None:
        self.data_dir = data_dir
        self.env = dict(env)
        self.servers: list[Any] = []
        self.claimed = False

    def run(self) -> int:
        with _signal_handlers(_raise_interrupted):
            try:
                return self._run()
            except _Interrupted as exc:
                say(f"{exc} received; stopping")
                return 0
            except LaunchError as exc:
                print(f"error: {exc}", file=sys.stderr, flush=True)
                return 1
            finally:
                signal.signal(signal.SIGINT, _still_stopping)
                signal.signal(signal.SIGTERM, _still_stopping)
                self._stop_servers()
                if self.claimed:
                    release_data_dir(self.data_dir)

    def _run(self) -> int:
        from app.embedded import EmbeddedServerError

        env = self.env
        self.data_dir.mkdir(parents=True, exist_ok=True)
        claim_data_dir(self.data_dir)
        self.claimed = True
        processes = procfile_processes(env)
        port = _port(env, "PORT", DEFAULT_PORT)
        flower_port = _port(env, "FLOWER_PORT", DEFAULT_FLOWER_PORT)
        flower_host = env.get("FLOWER_ADDRESS", "").strip() or "127.0.0.1"
        if "web" in processes and _port_in_use("0.0.0.0", port):
            raise LaunchError(f"port {port} is in use; choose another with PORT=...")
        if "flower" in processes and _port_in_use(flower_host, flower_port):
            raise LaunchError(f"port {flower_port} is in use; choose another with FLOWER_PORT=...")
        say(f"data folder: {self.data_dir}")

        try:
            database_url = self._database(env)
            broker_url = self._broker(env)
        except EmbeddedServerError as exc:
            raise LaunchError(str(exc)) from exc
        generated = local_credentials(env, self.data_dir)

        child_env = dict(env)
        child_env.update(generated)
        path = programs_path(child_env.get("PATH", ""))
        child_env.update({
            "DATABASE_URL": database_url,
            "CELERY_BROKER_URL": broker_url,
            "PORT": str(port),
            "FLOWER_PORT": str(flower_port),
            "DUNNING_DATA_DIR": str(self.data_dir),
            "PATH": path,
            "PYTHONUNBUFFERED": "1",
        })
        child_env.setdefault("FLOWER_UNAUTHENTICATED_API", "true")  # local use; see PITFALLS.md

        shown = {k: v for k, v in generated.items() if k != "SECRET_KEY"}
        if shown:
            say(f"local credentials (generated; kept in {self.data_dir / SECRETS_FILE}):")
            for name, value in shown.items():
                say(f"  {name}={value}")

        from app.migrate import upgrade

        say("migrating the database to the newest schema")
        upgrade(normalize_database_url(database_url))

        checks: dict[str, str] = {}
        if "web" in processes:
            checks["web"] = f"http://127.0.0.1:{port}/healthz"
            say(f"web app:  http://127.0.0.1:{port}/ (listening on 0.0.0.0:{port})")
        if "flower" in processes:
            host = "127.0.0.1" if flower_host in ("0.0.0.0", "") else flower_host
            checks["flower"] = f"http://{host}:{flower_port}/healthcheck"
            say(f"Flower:   http://{host}:{flower_port}/")
        say("starting " + ", ".join(processes) + "; Ctrl-C stops everything")
        return self._run_fleet(processes, child_env, checks)

    def _database(self, env: Mapping[str, str]) -> str:
        url = env.get("DATABASE_URL", "").strip()
        if url:
            normalize_database_url(url)  # fail early on a malformed one
            say("PostgreSQL: the server DATABASE_URL names")
            return url
        from app.embedded import EmbeddedPostgres

        pg = EmbeddedPostgres(self.data_dir)
        self.servers.append(pg)
        url = pg.start()
        say(f"PostgreSQL: private server in {pg.pgdata} ({url})")
        return url

    def _broker(self, env: Mapping[str, str]) -> str:
        url = env.get("CELERY_BROKER_URL", "").strip()
        if url:
            say("Redis: the broker CELERY_BROKER_URL names")
            return url
        from app.embedded import EmbeddedRedis

        redis = EmbeddedRedis(self.data_dir)
        self.servers.append(redis)
        url = redis.start()
        say(f"Redis: private server in {redis.dir} ({url})")
        return url

    def _run_fleet(self, processes: dict[str, str], env: dict[str, str],
                   checks: dict[str, str]) -> int:
        watcher = _ReadyWatcher(checks) if checks else None
        manager = _FleetManager(watcher, self.data_dir / FLEET_FILE)
        for name, cmd in processes.items():
            manager.add_process(name, cmd, env=env, cwd=os.getcwd())
        try:
            manager.loop()  # returns once every process has stopped
        finally:
            if watcher is not None:
                watcher.stopped.set()
            signal.signal(signal.SIGINT, _still_stopping)
            signal.signal(signal.SIGTERM, _still_stopping)
            _kill_leftover_groups(manager.child_pids())
        rc = manager.returncode
        if rc in (130, 143):  # honcho's code for "stopped by SIGINT / SIGTERM"
            return 0
        say("a process of the fleet exited (see above), so everything was stopped")
        return rc or 1

    def _stop_servers(self) -> None:
        for server in reversed(self.servers):
            name = type(server).__name__.removeprefix("Embedded")
            try:
                server.stop()
                say(f"{name}: stopped")
            except Exception as exc:
                print(f"error: could not stop the private {name} ({exc})", file=sys.stderr)
        self.servers.clear()


def data_dir_from(args: argparse.Namespace, env: Mapping[str, str]) -> Path:
    raw = getattr(args, "data_dir", None) or env.get("DUNNING_DATA_DIR") or DEFAULT_DATA_DIR
    return Path(raw).expanduser().resolve()


def main(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    # Before anything prints (honcho's printer takes sys.stdout when it is made).
    sys.stdout, sys.stderr = cast(TextIO, _Output(sys.stdout)), cast(TextIO, _Output(sys.stderr))
    return Launcher(data_dir_from(args, env), env).run()
