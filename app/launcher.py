"""`dunning run` (what `make run` does): the whole fleet on one machine.

1. PostgreSQL: ``DATABASE_URL`` if set, else a private server under the data folder (app.embedded).
2. Redis: ``CELERY_BROKER_URL`` if set, else a private server under the data folder. A server the
   environment names is waited for up to ``SERVER_WAIT`` seconds before anything starts (saying
   what for); one that does not answer by then, or refuses the credentials, stops the run, named
   with its password hidden (exit 3 for the database, as every `dunning` command's; 1 for the broker).
3. Local credentials: ``STRIPE_WEBHOOK_SECRET``, ``SERVICE_TOKENS``, ``SUPPORT_TOKENS`` and
   ``SECRET_KEY`` when unset are generated once and kept in ``<data>/local-secrets.json``; the run
   that generates them prints them (not ``SECRET_KEY``), later runs name the file only. Nothing the
   user configured is ever printed. So is Flower's login (``FLOWER_BASIC_AUTH``, user ``admin``)
   unless the user gives one (or ``FLOWER_AUTH``, or ``FLOWER_UNAUTHENTICATED_API=true``): only
   the file it is in is ever printed.
4. Migrations to head.
5. The Procfile's processes (web, worker, beat, flower) under honcho, with ``PORT``,
   ``FLOWER_PORT`` and ``DUNNING_DATA_DIR`` set. Flower asks for its login (its API applies tasks
   and shuts workers down); beyond a loopback address the user must give one.

Ctrl-C (SIGINT), SIGTERM or SIGHUP (the terminal closed) stops every process of the fleet, then the
private servers, at whatever point of the start it lands; a second one while the fleet stops kills
what is still running. Under `make run` so does make ending, or getting a SIGINT or SIGHUP to its
pid alone, which make does not pass on (MakeWatch). A program of the fleet or a private server that
ends on its own stops the rest, and the run exits with its status (1 for PostgreSQL, which is not
the launcher's child). A second run reuses the data folder (database, queued work, beat schedule,
local credentials); what a run killed outright (SIGKILL) left running is stopped by the next one.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, TextIO, cast
from urllib.parse import unquote, urlsplit

from honcho.environ import parse_procfile

from app.config import (
    ConfigError,
    _password_hidden,
    check_broker_url,
    normalize_database_url,
    shown,
    worker_metrics_port,
)
from app.fleet import (
    FLEET_FILE,
    MAKE_WATCH_INTERVAL,
    STOP_SIGNALS,
    FleetManager,
    Interrupted,
    LaunchError,
    MakeWatch,
    ReadyWatcher,
    claim_data_dir,
    kill_leftover_groups,
    release_data_dir,
    say,
    signal_handlers,
    still_stopping,
)

DEFAULT_DATA_DIR = ".dunning"
DEFAULT_PORT = 5000
DEFAULT_FLOWER_PORT = 5555
DEFAULT_WORKER_METRICS_PORT = 9808  # the Procfile's default
PORT_WAIT = 5.0  # how long a port a previous run's leftover held may take to be free
SECRETS_FILE = "local-secrets.json"
FLOWER_USER = "admin"  # the user of Flower's login make run generates
SERVER_WAIT = 30.0  # how long a server DATABASE_URL or CELERY_BROKER_URL names may take to answer
SERVER_RETRY = 1.0  # seconds between two tries
SERVER_CONNECT_TIMEOUT = 3  # seconds one try may take to connect

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
flower: case "${FLOWER_ADDRESS:-127.0.0.1}" in 127.0.0.1|localhost|::1) open_api=true ;; \
*) open_api=false ;; esac \
&& export FLOWER_UNAUTHENTICATED_API="${FLOWER_UNAUTHENTICATED_API:-$open_api}" \
&& exec celery -A tasks flower --address=${FLOWER_ADDRESS:-127.0.0.1} --port=${FLOWER_PORT:-5555}
"""


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
        return dict(parse_procfile(_read_named_procfile(named)).processes)
    checkout = Path(__file__).resolve().parent.parent / "Procfile"
    if checkout.is_file():
        return dict(parse_procfile(checkout.read_text()).processes)
    return dict(parse_procfile(DEFAULT_PROCFILE).processes)


def _read_named_procfile(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")  # whatever the locale: a Procfile is UTF-8 text
    except UnicodeDecodeError as exc:
        reason = f"it is not UTF-8 text (byte {exc.start})"
    except OSError as exc:  # one we may not read (its permissions), say
        reason = exc.strerror or exc.__class__.__name__
    raise LaunchError(f"DUNNING_PROCFILE names {path}, which cannot be read: {reason}")


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
        raise ConfigError(f"{name} must be a port number, got {shown(raw)}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"{name} must be a port number, got {shown(raw)}")
    return port


PROCESS_PORTS = {"web": "PORT", "flower": "FLOWER_PORT"}


def check_process_port(env: Mapping[str, str], process: str) -> None:
    """The port `dunning process NAME` gives its program (the Procfile's line), when set: a number from 0
    (any free port) to 65535. Else gunicorn's OverflowError traceback (PORT=70000), Flower's ValueError
    one (FLOWER_PORT=abc), or Flower on another port than the one named (70000 listened on 4464)."""
    if process == "worker":
        worker_metrics_port(env)  # the worker logged a value that is no port and served no metrics
        return
    name = PROCESS_PORTS.get(process)
    raw = env.get(name, "").strip() if name else ""
    if not raw:
        return
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 <= port < 65536:
        raise ConfigError(f"{name} must be a port number, got {shown(raw)}")


class CannotListen(Exception):
    """Not a port in use: the address is none of this machine's, the name does not resolve, the
    port is privileged, the address family is off. The message says which."""


def _port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:  # IPv6 off in this kernel
        raise CannotListen(exc.strerror or exc.__class__.__name__) from None
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn and tornado do
        try:
            sock.bind((host, port))
        except socket.gaierror as exc:
            raise CannotListen(f"no such address: {exc.strerror}") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise CannotListen(exc.strerror or exc.__class__.__name__) from None
    return False


def _port_free_soon(host: str, port: int, patience: float) -> bool:
    """Whether ``port`` is free, waiting up to ``patience`` seconds for it: a process of a previous
    run just stopped may hold its socket a moment longer."""
    from app.embedded import poll_until

    return poll_until(lambda: not _port_in_use(host, port), patience, 0.1)


def is_loopback(host: str) -> bool:
    """By address, not by spelling: a host name starting with ``127.`` may resolve anywhere. The
    only name taken on trust is localhost."""
    name = host.strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# What Flower 2.2 reads FLOWER_UNAUTHENTICATED_API as (flower.utils.strtobool, any case), on every request.
FLOWER_TRUE = ("y", "yes", "t", "true", "on", "1")
FLOWER_FALSE = ("n", "no", "f", "false", "off", "0")


def check_flower_basic_auth(env: Mapping[str, str]) -> None:
    """FLOWER_BASIC_AUTH, when set: ``user:password`` entries separated by commas alone. Flower splits it
    at each comma and keeps every character: an entry with no ':', or a blank or line break around it
    (``admin:a, ops:b``; a secret file's final newline), was a login nobody could ever give, every page
    and API call a 401. The value is never shown."""
    raw = env.get("FLOWER_BASIC_AUTH", "")
    if not raw.strip():
        return
    for number, entry in enumerate(raw.split(","), start=1):
        user, colon, password = entry.partition(":")
        if not (colon and user and password):
            raise LaunchError(f"FLOWER_BASIC_AUTH entry {number} must be user:password, entries separated by commas "
                              "(the value is not shown)")
        if entry != entry.strip():
            raise LaunchError(f"FLOWER_BASIC_AUTH entry {number} begins or ends with a blank or a line break, which "
                              "Flower keeps as part of the user or password, so that login never matches: separate "
                              "the entries with commas alone (the value is not shown)")


def flower_api_env(env: Mapping[str, str], flower_host: str, flower_port: int) -> dict[str, str]:
    """``FLOWER_UNAUTHENTICATED_API`` for Flower: its API applies tasks (tasks.retry_payment charges
    cards) and shuts workers down, so it is open without login only on a loopback address."""
    check_flower_basic_auth(env)
    said = env.get("FLOWER_UNAUTHENTICATED_API") or ""
    if said and said.lower() not in FLOWER_TRUE + FLOWER_FALSE:
        # Flower reads it on every request without a login and raised ValueError for any other value
        # (`enabled`, `true ` with a blank): each request was dropped unanswered, /healthcheck and
        # /metrics included, a traceback in Flower's log.
        raise LaunchError(f"FLOWER_UNAUTHENTICATED_API must be true or false (Flower also reads yes, on, 1 and no, "
                          f"off, 0), got {shown(said)}")
    if is_loopback(flower_host):
        return {"FLOWER_UNAUTHENTICATED_API": env.get("FLOWER_UNAUTHENTICATED_API") or "true"}
    if not (env.get("FLOWER_BASIC_AUTH", "").strip() or env.get("FLOWER_AUTH", "").strip()):
        raise LaunchError(
            f"FLOWER_ADDRESS={flower_host} makes Flower reachable from other machines on port "
            f"{flower_port}, and its API can run any task (tasks.retry_payment charges cards) or "
            "shut the workers down: set FLOWER_BASIC_AUTH=user:password, or leave FLOWER_ADDRESS "
            "unset (127.0.0.1)"
        )
    return {"FLOWER_UNAUTHENTICATED_API": "false"}


def _worker_metrics_port(env: Mapping[str, str]) -> dict[str, int]:
    """The worker's metrics port, when it is one to check: unset, the Procfile's default; 0 (any free
    port) none. A value that is no port is a ConfigError naming it (the worker served no metrics)."""
    port = worker_metrics_port(env)
    if port is None:
        return {"WORKER_METRICS_PORT": DEFAULT_WORKER_METRICS_PORT}
    return {"WORKER_METRICS_PORT": port} if port else {}


def check_worker_metrics_port(env: Mapping[str, str], patience: float) -> None:
    """The worker's metrics port taken (another `make run`'s worker, on another data folder): the
    worker would start, log an error and serve no metrics. Refused here, as the web's and Flower's."""
    port = _worker_metrics_port(env).get("WORKER_METRICS_PORT")
    if port is None:
        return
    host = env.get("WORKER_METRICS_ADDR", "").strip().strip("[]") or "0.0.0.0"  # as tasks/metrics.py binds it
    try:
        if not _port_free_soon(host, port, patience):
            raise LaunchError(f"port {port} is in use; choose another with WORKER_METRICS_PORT=... "
                              "(the worker's metrics)")
    except CannotListen as exc:
        raise LaunchError(
            f"the worker's metrics cannot listen on {host}:{port} ({exc}): set WORKER_METRICS_ADDR to an "
            "address of this machine (unset, 0.0.0.0), or choose another WORKER_METRICS_PORT") from None


def check_ports(processes: Mapping[str, str], ports: Mapping[str, int]) -> None:
    """Two of the fleet's servers on one port: the second would fail to start."""
    users = {"PORT": "web", "FLOWER_PORT": "flower", "WORKER_METRICS_PORT": "worker"}
    seen: dict[int, str] = {}
    for name, number in ports.items():
        if users[name] not in processes:
            continue
        if number in seen:
            raise LaunchError(
                f"{seen[number]} and {name} are both {number}: web, Flower and the worker's "
                "metrics each need a port of their own; change one of them"
            )
        seen[number] = name


# gunicorn's: the Procfile's web line passes them as --workers and --worker-connections, and gunicorn
# itself reads WEB_CONCURRENCY when it starts (int(), its default for --workers).
WEB_COUNTS = {"WEB_CONCURRENCY": "gunicorn workers", "WEB_CONNECTIONS": "requests one gunicorn worker serves at once"}


def check_web_settings(env: Mapping[str, str]) -> None:
    """WEB_CONCURRENCY and WEB_CONNECTIONS, each a whole number of at least 1 when set (empty is unset:
    :func:`web_env`). Else gunicorn's traceback (WEB_CONCURRENCY=abc, or 1.5), or a web process that
    answered nothing while it ran: 0 workers, or workers that take 0 connections each."""
    for name, what in WEB_COUNTS.items():
        raw = env.get(name, "").strip()
        if not raw:
            continue
        try:
            number = int(raw)
        except ValueError:
            number = 0
        if number < 1:
            raise ConfigError(f"{name} ({what}) must be a whole number of at least 1, got {shown(raw)}")


def web_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` less an empty WEB_CONCURRENCY or WEB_CONNECTIONS (a compose file's ``${WEB_CONCURRENCY}``
    with nothing set): unset, as the Procfile's defaults take it, rather than gunicorn's int('')."""
    return {name: value for name, value in env.items() if not (name in WEB_COUNTS and not value.strip())}


# Where the launcher fills in what the environment leaves unset, a value of the right form stands in
# while the settings are checked: the private servers have no URL yet, the credentials are generated.
SETTINGS_STAND_INS = {
    "DATABASE_URL": "postgresql://postgres@localhost/postgres",
    "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0",
}


def check_settings(env: Mapping[str, str]) -> None:
    """The settings and policy file every process of the fleet reads at its start, checked once
    before anything starts: ConfigError or PolicyFileError, naming what is wrong. Else the private
    servers and the fleet started, and web, worker, beat and Flower each died with a traceback."""
    from app.config import Settings
    from app.history.prune import check_retention
    from app.policy_file import load_policy

    checked = dict(env)
    for name, stand_in in SETTINGS_STAND_INS.items():
        if not env.get(name, "").strip():
            checked[name] = stand_in
    settings = Settings.from_env(checked)
    check_retention(settings.history_retention_days, load_policy(settings.policy_path))


# --- servers the environment names --------------------------------------------------------------

SERVER_NAMES = {"DATABASE_URL": "PostgreSQL", "CELERY_BROKER_URL": "the broker"}


class ServerUnreachable(LaunchError):
    """A server the environment names does not answer, or refuses the connection. ``status`` is the
    run's exit status: 3 for the database, as every `dunning` command that cannot reach it."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _Refused(Exception):
    """The server answered and refused: a wrong password, no such user or database. Waiting does not
    change that."""


# libpq's words (after "FATAL:") for a server that answered and refused the connection for good
_PG_REFUSALS = re.compile(r"authentication failed|no pg_hba\.conf entry|does not exist|no password supplied"
                          r"|permission denied")
# redis-py's and py-amqp's words for a login refused (AuthenticationError, WRONGPASS, NOAUTH,
# "invalid username-password pair", ACCESS_REFUSED, ...), in the error or the one it wraps (kombu's)
_BROKER_REFUSALS = re.compile(r"(?i)auth|wrongpass|password|access.refused|not.allowed")


def _broker_refused(exc: BaseException | None, url: str = "") -> bool:
    """Whether ``exc`` (or an error it wraps) is the broker refusing the login. The client's words
    name the host ("Error -2 connecting to redis-auth:6379. Name or service not known."): ``url``'s
    host is left out of them first, or a host named for auth (redis-auth, oauth-cache) that is not up
    yet read as a refused login, and the run stopped without waiting for it."""
    try:
        host = urlsplit(url).hostname if url else None
    except ValueError:  # checked at start already; nothing to leave out then
        host = None
    # The host as a name of its own only (not the "Auth" of AuthenticationError when the host is auth).
    named = re.compile(rf"(?i)(?<![\w.-]){re.escape(host)}(?![\w-])") if host else None
    seen = 0
    while exc is not None and seen < 5:
        words = f"{type(exc).__name__} {exc}"
        if _BROKER_REFUSALS.search(named.sub("", words) if named is not None else words):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _scrubbed(text: str, url: str) -> str:
    """``text`` (a client library's words) with every password of ``url`` (';'-separated URLs
    too), as written and decoded, as ``***``."""
    for part in url.split(";"):
        userinfo = part.partition("://")[2].rpartition("@")[0]
        _user, colon, password = userinfo.partition(":")
        if colon and password:
            for shown in {password, unquote(password)}:
                text = text.replace(shown, "***")
    return text


def _hidden(url: str) -> str:
    return ";".join(_password_hidden(part) for part in url.split(";"))


def _try_database(url: str) -> None:
    """Connect once to the PostgreSQL ``url`` names (as the migrations will); an exception when it
    does not answer, :class:`_Refused` when it refuses."""
    from sqlalchemy import create_engine, make_url, pool
    from sqlalchemy.exc import DBAPIError

    target = make_url(normalize_database_url(url))
    connect_args = {} if "connect_timeout" in target.query else {"connect_timeout": SERVER_CONNECT_TIMEOUT}
    engine = create_engine(target, poolclass=pool.NullPool, connect_args=connect_args)
    try:
        with engine.connect():
            pass
    except DBAPIError as exc:
        reason = str(exc.orig).strip()
        if _PG_REFUSALS.search(reason):
            raise _Refused(reason) from None
        raise RuntimeError(reason) from None
    finally:
        engine.dispose()


def _try_broker(url: str) -> None:
    """Connect once to the broker ``url`` names (kombu's connection, as the workers'; any one of a
    ';'-separated failover list answering will do); an exception when none answers."""
    from kombu import Connection

    last: Exception | None = None
    for part in url.split(";"):
        connection = Connection(part, connect_timeout=SERVER_CONNECT_TIMEOUT)
        try:
            connection.ensure_connection(max_retries=0)
            return
        except Exception as exc:
            if _broker_refused(exc, part):
                raise _Refused(str(exc) or type(exc).__name__) from None
            last = exc
        finally:
            connection.release()
    raise RuntimeError(str(last) or type(last).__name__)


def wait_for_server(name: str, url: str, patience: float) -> None:
    """Wait up to ``patience`` seconds for the server ``name`` (DATABASE_URL, CELERY_BROKER_URL)
    names to answer, saying once what for: it may be starting too (a compose file, a reboot).
    LaunchError when it does not answer by then, or refuses the credentials (at once). The URL is
    shown with its password hidden, and the client's words without it."""
    from app.embedded import poll_until

    what, shown = SERVER_NAMES[name], _hidden(url)
    status = 3 if name == "DATABASE_URL" else 1
    attempt = _try_database if name == "DATABASE_URL" else _try_broker
    reason = ""
    said = False

    def answers() -> bool:
        nonlocal reason, said
        try:
            attempt(url)
            return True
        except _Refused as exc:
            raise ServerUnreachable(f"{what} at {shown} ({name}) refused the connection: "
                                    f"{_scrubbed(str(exc), url)}", status) from None
        except Exception as exc:
            reason = _scrubbed(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, url)
        if not said:
            said = True
            say(f"waiting up to {patience:.0f} s for {what} at {shown} ({name}): {reason}")
        return False

    if not poll_until(answers, patience, SERVER_RETRY):
        raise ServerUnreachable(f"{what} at {shown} ({name}) did not answer within {patience:.0f} s ({reason}); "
                                f"start it, or correct or unset {name} (unset, make run starts a private one)", status)


def local_credentials(env: Mapping[str, str], data_dir: Path) -> dict[str, str]:
    """Values for the credentials the environment leaves unset, kept in the data folder so a
    second run (and anything configured with them, e.g. `stripe listen`) keeps working."""
    return load_local_credentials(env, data_dir)[0]


def flower_login_wanted(env: Mapping[str, str], processes: Mapping[str, str]) -> bool:
    """Whether Flower runs under a login make run keeps (or the user's ``FLOWER_BASIC_AUTH``). Its
    API applies any task and shuts workers down; open on loopback, it is open to every local user
    and to any web page in the developer's browser (Flower then takes cross-site requests). Not with
    Flower's OAuth (``FLOWER_AUTH``), nor when the user asks for an open API by name."""
    if "flower" not in processes or env.get("FLOWER_AUTH", "").strip():
        return False
    return env.get("FLOWER_UNAUTHENTICATED_API", "").strip().lower() not in ("true", "yes", "on", "1", "y", "t")


def load_local_credentials(env: Mapping[str, str], data_dir: Path,
                           flower_login: bool = False) -> tuple[dict[str, str], list[str]]:
    """:func:`local_credentials`, and the names of those made by this call (the others were in
    the data folder already). With ``flower_login``, Flower's login too, unless the user gives
    one or uses Flower's OAuth (``FLOWER_AUTH``)."""
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
    if flower_login and not env.get("FLOWER_AUTH", "").strip():
        makers["FLOWER_BASIC_AUTH"] = lambda: f"{FLOWER_USER}:{secrets.token_urlsafe(24)}"
    chosen: dict[str, str] = {}
    made: list[str] = []
    for name, make in makers.items():
        if env.get(name, "").strip():
            continue  # configured by the user: use it, never print it
        value = stored.get(name)
        if isinstance(value, str) and value:
            chosen[name] = value
        else:
            chosen[name] = make()
            made.append(name)
    if made:
        merged = {**stored, **chosen}
        # Written beside it, then put in its place: the kept credentials survive a write that fails
        # half-way (a full disk, a stop signal).
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(merged, fh, indent=2)
                fh.write("\n")
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    return chosen, made


def unusable_data_dir(exc: OSError, data_dir: Path) -> str:
    """What the launcher says when a file cannot be made or written. In the data folder (or with no
    file named: a write to a full disk) the folder is at fault: it is a file, read-only, not this
    user's, or its disk is full."""
    reason = exc.strerror or exc.__class__.__name__
    if exc.filename and not _in_folder(Path(os.fsdecode(exc.filename)), data_dir):
        return f"{reason}: {os.fsdecode(exc.filename)}"
    where = f" ({os.fsdecode(exc.filename)})" if exc.filename else ""
    return (f"{reason}{where}: the data folder {data_dir} must be a folder this user can write, on a disk "
            "with free space; choose another with --data-dir or DUNNING_DATA_DIR")


def _in_folder(path: Path, folder: Path) -> bool:
    path = path.absolute()
    return path == folder or folder in path.parents


class Launcher:
    def __init__(self, data_dir: Path, env: Mapping[str, str]) -> None:
        self.data_dir = data_dir
        self.env = dict(env)
        self.servers: list[Any] = []
        self.claimed = False
        self.stop_signal: str | None = None
        self.stop_reason: str | None = None  # what make's state meant (MakeWatch), when that stopped the run
        self.relayed = False  # stopped for make's signal, which may reach this process too
        self.manager: FleetManager | None = None
        self.make_watch: MakeWatch | None = None

    def run(self) -> int:
        with signal_handlers(self._interrupt):
            self._watch_make()
            try:
                return self._run()
            except BaseException as exc:
                if self.stop_signal is not None:
                    # the interrupt itself, or whatever it turned into on its way up (an
                    # exception raised while a library cleaned up after it)
                    say(f"{self.stop_reason or self.stop_signal + ' received'}; stopping")
                    return 0
                if isinstance(exc, LaunchError):
                    print(f"error: {exc}", file=sys.stderr, flush=True)
                    return exc.status if isinstance(exc, ServerUnreachable) else 1
                if isinstance(exc, OSError):
                    print(f"error: {unusable_data_dir(exc, self.data_dir)}", file=sys.stderr, flush=True)
                    return 1
                raise
            finally:
                self._unwatch_make()
                for sig in STOP_SIGNALS:
                    signal.signal(sig, still_stopping)
                self._stop_servers()
                if self.claimed:
                    release_data_dir(self.data_dir)

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self.relayed:
            # The terminal's Ctrl-C reaches make and this process at once: the one stop, already
            # under way.
            self.relayed = False
            return
        self.stop_signal = signal.Signals(signum).name
        raise Interrupted(self.stop_signal)

    def _watch_make(self) -> None:
        """Under make (MakeWatch): a look at make every MAKE_WATCH_INTERVAL, from a timer signal
        (SIGALRM) in the main thread, as a stop signal is handled; no thread runs while the fleet's
        helpers are forked."""
        self.make_watch = MakeWatch.of_parent()
        if self.make_watch is None:
            return
        signal.signal(signal.SIGALRM, self._look_at_make)
        signal.setitimer(signal.ITIMER_REAL, MAKE_WATCH_INTERVAL, MAKE_WATCH_INTERVAL)

    def _unwatch_make(self) -> None:
        if self.make_watch is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)

    def _look_at_make(self, signum: int, frame: FrameType | None) -> None:
        assert self.make_watch is not None
        found = self.make_watch.stopping()
        if found is None:
            return
        signal.setitimer(signal.ITIMER_REAL, 0)  # once
        sig, why = found
        # Handled as that signal would be, by whichever handler it has now; nothing once stopping.
        handler = signal.getsignal(sig)
        if self.manager is not None and handler == self.manager._on_signal:
            self.manager.relay_stop(sig, why)
        elif handler == self._interrupt and self.stop_signal is None:
            self.stop_signal = sig.name
            self.stop_reason = why
            self.relayed = True
            raise Interrupted(self.stop_signal)

    def _checkpoint(self) -> None:
        """Stop here if a stop signal came earlier: the exception its handler raised can be lost
        on its way up (C code that clears errors: one landing while psycopg2's extension module
        was being imported went unnoticed, and the fleet started)."""
        if self.stop_signal is not None:
            raise Interrupted(self.stop_signal)

    def _run(self) -> int:
        from app.embedded import EmbeddedServerError

        env = self.env
        self.data_dir.mkdir(parents=True, exist_ok=True)
        left_behind = claim_data_dir(self.data_dir)
        self.claimed = True
        self._checkpoint()
        processes = procfile_processes(env)
        port = _port(env, "PORT", DEFAULT_PORT)
        flower_port = _port(env, "FLOWER_PORT", DEFAULT_FLOWER_PORT)
        # An IPv6 address as a URL writes it, [::1], is the bare address to bind (Tornado's too).
        flower_host = env.get("FLOWER_ADDRESS", "").strip().strip("[]") or "127.0.0.1"
        check_ports(processes, {"PORT": port, "FLOWER_PORT": flower_port, **_worker_metrics_port(env)})
        flower_env = ({**flower_api_env(env, flower_host, flower_port), "FLOWER_ADDRESS": flower_host}
                      if "flower" in processes else {})
        check_settings(env)
        if "web" in processes:
            check_web_settings(env)
        patience = PORT_WAIT if left_behind else 0.0
        try:
            if "web" in processes and not _port_free_soon("0.0.0.0", port, patience):
                raise LaunchError(f"port {port} is in use; choose another with PORT=...")
        except CannotListen as exc:
            raise LaunchError(f"the web app cannot listen on 0.0.0.0:{port} ({exc}); choose another PORT") from None
        try:
            if "flower" in processes and not _port_free_soon(flower_host, flower_port, patience):
                raise LaunchError(f"port {flower_port} is in use; choose another with FLOWER_PORT=...")
        except CannotListen as exc:
            shown = f"[{flower_host}]" if ":" in flower_host else flower_host
            raise LaunchError(
                f"Flower cannot listen on {shown}:{flower_port} ({exc}): set FLOWER_ADDRESS to an address of "
                "this machine (unset, 127.0.0.1), or choose another FLOWER_PORT") from None
        if "worker" in processes:
            check_worker_metrics_port(env, patience)
        say(f"data folder: {self.data_dir}")

        for name in SERVER_NAMES:  # before a private server starts for nothing
            if env.get(name, "").strip():
                wait_for_server(name, env[name].strip(), SERVER_WAIT)
                self._checkpoint()
        try:
            database_url = self._database(env)
            self._checkpoint()
            broker_url = self._broker(env)
            self._checkpoint()
        except EmbeddedServerError as exc:
            raise LaunchError(str(exc)) from exc
        flower_login = flower_login_wanted(env, processes)
        credentials, made = load_local_credentials(env, self.data_dir, flower_login)
        # Flower's login is for Flower alone: the other programs have no use for it.
        flower_credentials = {name: credentials.pop(name) for name in ("FLOWER_BASIC_AUTH",) if name in credentials}
        if flower_login:
            flower_env["FLOWER_UNAUTHENTICATED_API"] = "false"

        child_env = web_env(env)
        child_env.update(credentials)
        path = programs_path(child_env.get("PATH", ""))
        child_env.update({
            "DATABASE_URL": database_url,
            "CELERY_BROKER_URL": broker_url,
            "PORT": str(port),
            "FLOWER_PORT": str(flower_port),
            "DUNNING_DATA_DIR": str(self.data_dir),
            "PATH": path,
            "PYTHONUNBUFFERED": "1",
            **flower_env,
        })

        secrets_file = self.data_dir / SECRETS_FILE
        new = [name for name in made if name in credentials and name != "SECRET_KEY"]
        if new:
            say(f"local credentials, generated now and kept in {secrets_file} "
                "(printed this once; later runs read them from there):")
            for name in new:
                say(f"  {name}={credentials[name]}")
        kept = [name for name in credentials if name not in made and name != "SECRET_KEY"]
        if kept:
            say(f"local credentials {', '.join(kept)}: generated by an earlier run, kept in {secrets_file}")

        from app.migrate import upgrade

        say("migrating the database to the newest schema")
        upgrade(normalize_database_url(database_url))
        self._checkpoint()

        checks: dict[str, str] = {}
        if "web" in processes:
            checks["web"] = f"http://127.0.0.1:{port}/healthz"
            say(f"web app:  http://127.0.0.1:{port}/ (listening on 0.0.0.0:{port})")
        if "flower" in processes:
            host = "127.0.0.1" if flower_host in ("0.0.0.0", "") else flower_host
            if host == "::":
                host = "::1"
            shown = f"[{host}]" if ":" in host else host
            checks["flower"] = f"http://{shown}:{flower_port}/healthcheck"
            if flower_credentials:  # the password only in the file: terminals' scrollback, `| tee` logs
                user = flower_credentials["FLOWER_BASIC_AUTH"].partition(":")[0]
                login = f" (login {user}, its password in {secrets_file}: FLOWER_BASIC_AUTH)"
            elif env.get("FLOWER_BASIC_AUTH", "").strip():
                login = " (the login FLOWER_BASIC_AUTH names)"
            elif env.get("FLOWER_AUTH", "").strip():
                login = " (Flower's OAuth login: FLOWER_AUTH)"
            else:
                login = " (its API open without login: FLOWER_UNAUTHENTICATED_API)"
            say(f"Flower:   http://{shown}:{flower_port}/{login}")
        say("starting " + ", ".join(processes) + "; Ctrl-C stops everything")
        return self._run_fleet(processes, child_env, checks, flower_credentials)

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
            check_broker_url(url)  # fail early on a malformed one, as the database's
            say("broker: the server CELERY_BROKER_URL names")
            return url
        from app.embedded import EmbeddedRedis

        redis = EmbeddedRedis(self.data_dir)
        self.servers.append(redis)
        url = redis.start()
        # The URL holds the server's password: not printed (terminals' scrollback, `| tee` logs).
        say(f"Redis: private server in {redis.dir} (127.0.0.1:{redis.port}, password in {redis.config})")
        return url

    def _run_fleet(self, processes: dict[str, str], env: dict[str, str],
                   checks: dict[str, str], flower_env: Mapping[str, str]) -> int:
        watcher = ReadyWatcher(checks) if checks else None
        manager = FleetManager(watcher, self.data_dir / FLEET_FILE)
        for name, cmd in processes.items():
            manager.add_process(name, cmd, env={**env, **flower_env} if name == "flower" else env, cwd=os.getcwd())
        self.manager = manager
        self._checkpoint()
        try:
            # returns once every process has stopped
            manager.loop(lambda: self.stop_signal, self._server_ended)
        finally:
            if watcher is not None:
                watcher.stopped.set()
            for sig in STOP_SIGNALS:
                signal.signal(sig, still_stopping)
            kill_leftover_groups(manager.child_pids())
        if manager.stop_signal is not None:
            self.stop_signal = manager.stop_signal
            return 0
        what = manager.ended or "a process of the fleet exited (see above)"
        say(f"{what}, so everything was stopped")
        code = manager.returncode or 1
        return 128 - code if code < 0 else code  # killed by signal N (-N): 128 + N, as a shell says

    def _server_ended(self) -> tuple[str, int] | None:
        """A private server that ended while the fleet runs (the OOM killer, a stray kill): what to
        say, and its status as honcho gives a program's (-N: killed by signal N)."""
        for server in self.servers:
            code = server.exited()
            if code is None:
                continue
            # pg_ctl daemonizes PostgreSQL: its status is not this process's to know
            status = "" if server.label == "PostgreSQL" else (
                f"rc={code}; " if code >= 0 else f"killed by {_signal_name(-code)}; ")
            return f"the private {server.label} exited ({status}its log: {server.log})", code
        return None

    def _stop_servers(self) -> None:
        for server in reversed(self.servers):
            name = type(server).__name__.removeprefix("Embedded")
            try:
                server.stop()
                say(f"{name}: stopped")
            except Exception as exc:
                print(f"error: could not stop the private {name} ({exc})", file=sys.stderr)
        self.servers.clear()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def data_dir_from(args: argparse.Namespace, env: Mapping[str, str]) -> Path:
    raw = getattr(args, "data_dir", None) or env.get("DUNNING_DATA_DIR") or DEFAULT_DATA_DIR
    return Path(raw).expanduser().resolve()


def main(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    # Before anything prints (honcho's printer takes sys.stdout when it is made).
    sys.stdout, sys.stderr = cast(TextIO, _Output(sys.stdout)), cast(TextIO, _Output(sys.stderr))
    return Launcher(data_dir_from(args, env), env).run()
