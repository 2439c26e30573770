"""Settings read from the environment once, by a factory; nothing is read at import."""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"

# While a task's message is unacknowledged, Redis hands it to another worker once it is older than
# CELERY_VISIBILITY_TIMEOUT: the task would run twice. A message is held unacknowledged through its
# countdown (at most MAX_COUNTDOWN, tasks/failures.py), then, when its countdown ends while every
# pool process is busy, while it waits for one behind a task that may run to its hard time limit,
# and then while it runs itself, to at most that limit. So every task's hard limit is what leaves
# room for all three (``task_time_limits``), and the minimum timeout is the one that leaves a hard
# limit of MIN_TASK_TIME_LIMIT, room for a Stripe call's timeouts and the relay's budget.
# tests/unit/test_config.py checks these against the tasks' own constants.
MAX_TASK_COUNTDOWN = 60
REDELIVERY_MARGIN = 5
MIN_TASK_TIME_LIMIT = 60
SOFT_LIMIT_HEADROOM = 10  # the soft limit comes first, so a task can record why it stops
MIN_VISIBILITY_TIMEOUT = MAX_TASK_COUNTDOWN + REDELIVERY_MARGIN + 2 * MIN_TASK_TIME_LIMIT  # 185 s
DEFAULT_VISIBILITY_TIMEOUT = 300
# A message a dead worker held comes back only after the timeout: past a day, a crash loses the
# task for longer than any schedule here waits (and Celery's time limits grow with it, unbounded).
MAX_VISIBILITY_TIMEOUT = 24 * 3600


def task_time_limits(visibility_timeout: int) -> tuple[int, int]:
    """(hard, soft) time limit of every task under this visibility timeout: a countdown, a wait for a
    pool process behind one task at its hard limit and the task's own run all fit inside it."""
    hard = (visibility_timeout - MAX_TASK_COUNTDOWN - REDELIVERY_MARGIN) // 2
    return hard, hard - SOFT_LIMIT_HEADROOM


class ConfigError(Exception):
    """A setting is missing or malformed; the message names it."""


SHOWN_LENGTH = 40  # the most of a value an error quotes


def cut(text: str, length: int = SHOWN_LENGTH) -> str:
    """``text`` as an error shows it: whole when short, else its beginning and how long it was. A
    value thousands of characters long (a 5,000-digit number, a file pasted in place of a value) was
    quoted whole, an error line of that length in every log and terminal."""
    return text if len(text) <= length else f"{text[:length]}... ({len(text)} characters)"


def shown(value: str) -> str:
    """``value`` quoted, as ``{value!r}`` quotes it, cut (:func:`cut`) when long."""
    return repr(value) if len(value) <= SHOWN_LENGTH else f"{value[:SHOWN_LENGTH]!r}... ({len(value)} characters)"


def normalize_database_url(url: str) -> str:
    """Map the usual ``postgresql://`` form to the psycopg2 driver.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` URL to psycopg 3, which this project does not
    ship; operators write the bare form, so we pick the driver here. Explicit forms pass through.
    """
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg2://" + url[len(prefix):]
            break
    else:
        if not url.startswith("postgresql+psycopg2://"):
            # psycopg 3, asyncpg...: drivers this project does not ship (nor use the way it needs).
            raise ConfigError(f"DATABASE_URL must be a PostgreSQL URL for psycopg2 (postgresql://... or "
                              f"postgresql+psycopg2://...), {_scheme_shown(url)}")
    _check_connect_parameters(_connect_parameters(url))
    return url


def _connect_parameters(url: str) -> dict[str, object]:
    """What psycopg2.connect will be given for ``url``, as SQLAlchemy's dialect renders it (hosts,
    ports, and the query's options), without connecting."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()()
        if parsed.port == 0 or 0 in _query_ports(dialect, parsed):
            # The dialect renders no port for it, in the address as in the query's forms (?host=h1:0,
            # ?host=h1,h2&port=5432,0): libpq used the default (5432) without a word.
            raise ConfigError("DATABASE_URL's port must be a number from 1 to 65535, got 0")
        _args, params = dialect.create_connect_args(parsed)
    except ValueError:
        # Not the parser's message: it quotes what it took for the port, which is part of the password
        # when that holds an unencoded '@' (postgresql://u:p@ss:word@host/db).
        if "," in url.partition("://")[2].rpartition("@")[2].partition("/")[0]:
            # libpq's own multi-host form (postgresql://h1:5432,h2:5433/db), which SQLAlchemy does not
            # read: the port it found no number in was "5432,h2:5433", not a password's.
            raise ConfigError("DATABASE_URL names several hosts as libpq writes them (host1:5432,host2:5432), which "
                              "cannot be read here: give them as postgresql://user@/db?host=host1:5432&host=host2:5432"
                              ) from None
        raise ConfigError("DATABASE_URL cannot be read: its port is not a number (the value is not shown: it may "
                          "hold a password, and one holding '@' must be percent-encoded as %40)") from None
    except ArgumentError as exc:  # the multi-host forms; these messages name hosts and ports only
        raise ConfigError(f"DATABASE_URL cannot be read: {cut(str(exc), 120)}") from None  # it may quote a port
    return dict(params)


def _query_ports(dialect: object, parsed: object) -> tuple[int | None, ...]:
    """The ports the query's multi-host forms give (?host=h1:5432&host=h2:5433, ?host=h1,h2&port=...),
    as the PostgreSQL dialect reads them (its ArgumentError and ValueError are the caller's)."""
    split = getattr(dialect, "_split_multihost_from_url", None)
    if split is None:  # not in this SQLAlchemy: tests/unit/test_config_urls.py says so
        return ()
    _hosts, ports = split(parsed)
    return tuple(ports or ())


# libpq reads these only when it connects: a wrong value would fail the first request (a 500, a CLI
# traceback), not the start. Checked here, by name; libpq itself refuses a name it does not know.
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
WHOLE_NUMBER_OPTIONS = ("connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval",
                        "keepalives_count", "tcp_user_timeout")
_WHOLE_NUMBER = re.compile(r"\s*[+-]?[0-9]+\s*")  # libpq's strtol: signed, blanks around
_UNKNOWN_OPTION = re.compile(r'invalid connection option "([^"]*)"')


def _check_connect_parameters(params: dict[str, object]) -> None:
    for port in str(params.get("port", "")).split(","):  # one per host; empty: the default
        if port and not (_WHOLE_NUMBER.fullmatch(port) and 0 < int(port) < 65536):
            raise ConfigError(f"DATABASE_URL's port must be a number from 1 to 65535, got {cut(port.strip())}")
    options = {k: v for k, v in params.items() if k not in ("host", "port", "dbname", "user", "password")}
    _check_option_names(options)
    sslmode = options.get("sslmode")
    if sslmode is not None and sslmode not in SSL_MODES:
        raise ConfigError(f"DATABASE_URL's sslmode must be one of {', '.join(SSL_MODES)}, got {shown(str(sslmode))}")
    for name in WHOLE_NUMBER_OPTIONS:
        value = options.get(name)
        if value is not None and not (isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value)
                                      and -2**31 <= int(value) < 2**31):
            raise ConfigError(f"DATABASE_URL's {name} must be a whole number, got {shown(str(value))}")


def _check_option_names(options: dict[str, object]) -> None:
    """libpq's own list of the connection options it knows (psycopg2 parses the rendered options with
    it). The password is not among what is parsed, so no message can hold it."""
    import psycopg2
    from psycopg2.extensions import make_dsn

    try:
        make_dsn(**options)
    except psycopg2.ProgrammingError as exc:
        unknown = _UNKNOWN_OPTION.search(str(exc))
        what = (f"an option PostgreSQL does not know: {shown(unknown.group(1))}" if unknown
                else "options that cannot be read")
        raise ConfigError(f"DATABASE_URL has {what}") from None


# What an RFC 3986 scheme may hold: anything else before a '://' is not one (a user name and password
# written before a forgotten scheme, say).
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def _scheme_shown(url: str) -> str:
    """What an error may say about a URL it refuses: its scheme, never the rest, which may hold a
    password (a mistyped ``postgresql//user:password@host`` has no scheme at all)."""
    scheme, sep, _rest = url.partition("://")
    if sep and _SCHEME.fullmatch(scheme):
        return f"got the scheme {shown(scheme)}"
    return "but it has no scheme (the value is not shown: it may hold a password)"


# The brokers the product runs on (tasks/factory.py): Redis through its own transport and lane
# (redis, rediss), or kombu's (a Unix socket, Sentinel); RabbitMQ through Celery's own path.
BROKER_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel", "amqp", "amqps", "pyamqp")
_REDIS_DB = re.compile(r"/?[0-9]*")  # the path of a redis:// URL is the database number
# A password's '/', '?' or '#' ends the URL's address early: what follows is read as its port or path.
_BROKER_NOT_SHOWN = ("(the value is not shown: it may hold a password, which must be percent-encoded when it holds "
                     "'/', '?' or '#': %2F, %3F, %23)")


def check_broker_url(url: str) -> str:
    """``url`` when every broker it names (kombu takes several, ';'-separated, for failover) has a
    known scheme, a port that is a number in range, and on Redis a database number. Otherwise
    ConfigError: the web would store a webhook and then fail to queue it, the workers fail to start."""
    for part in url.split(";"):
        scheme = part.partition("://")[0]
        if scheme not in BROKER_SCHEMES:
            raise ConfigError(f"CELERY_BROKER_URL must be a Redis (redis://host:6379/0) or RabbitMQ (amqp://...) URL, "
                              f"{_scheme_shown(part)}")
        if scheme != "redis+socket":
            _check_broker_address(part, redis=scheme in ("redis", "rediss"))
    return url


def check_result_backend(url: str | None) -> str | None:
    """``url`` (CELERY_RESULT_BACKEND) when, naming a Redis server, it is one redis-py can address,
    and otherwise one Celery has a backend for that every process can read; ConfigError otherwise.
    The rest of Celery's other backends (db+..., ...) is Celery's to read."""
    if url is not None and url.partition("://")[0] in ("redis", "rediss"):
        _check_broker_address(url, redis=True, name="CELERY_RESULT_BACKEND")
        if url.startswith("rediss://") and "ssl_cert_reqs=" not in url.partition("?")[2]:
            # Celery's Redis result backend refuses it when it is built: every worker failed at its start.
            raise ConfigError("CELERY_RESULT_BACKEND is a rediss:// URL without ssl_cert_reqs, which Celery's Redis "
                              "result backend requires: add ?ssl_cert_reqs=required (or optional, none)")
    elif url is not None:
        from celery.app.backends import by_url

        for prefix in ("db+postgres://", "db+postgresql://"):
            if url.startswith(prefix):
                # Celery's database backend hands the rest to SQLAlchemy, which maps a bare
                # postgresql:// to psycopg 3, not shipped here: every result stored or read failed
                # (No module named 'psycopg'), the support page's Recompute with it. As DATABASE_URL.
                url = "db+postgresql+psycopg2://" + url[len(prefix):]
                break

        try:
            # The backend's class, by the URL's scheme (imports its module; connects to nothing), and
            # the URL it is given (cache+memory:// -> memory://).
            backend, backend_url = by_url(url)
        except Exception:  # ImproperlyConfigured (no such alias), ImportError (nor a module of that name)
            # Every worker failed at its start with Celery's traceback, and the support page's task
            # results were never kept (its status answered 503 "unreachable" for ever).
            raise ConfigError(f"CELERY_RESULT_BACKEND names no result backend Celery has, {_scheme_shown(url)}"
                              " (e.g. redis://host:6379/1, db+postgresql://...)") from None
        unshared = _unshared_result_backend(backend, backend_url)
        if unshared is not None:
            raise ConfigError(f"CELERY_RESULT_BACKEND {unshared}: the support page asks a task's state from "
                              "whichever web process serves the poll, so its Recompute stayed PENDING for ever. "
                              "Use a store every process reads (redis://host:6379/1, db+postgresql://...), or "
                              "leave it unset (the broker when it is Redis, else the database)")
    return url


def _unshared_result_backend(backend: type, url: str) -> str | None:
    """Why a result backend's results cannot be read by another process than the worker's or the
    sender's, or None when they can."""
    from celery.backends.base import DisabledBackend
    from celery.backends.cache import CacheBackend
    from celery.backends.rpc import RPCBackend

    if issubclass(backend, RPCBackend):
        # A result is a message to the reply queue of the process that sent the task, consumed by it
        # alone (and lost with it): another web process polling the task sees PENDING for ever.
        return "rpc:// sends a task's result to the process that sent the task only"
    if issubclass(backend, DisabledBackend):
        return "disabled:// keeps no result"
    if issubclass(backend, CacheBackend) and url.startswith("memory"):
        return "cache+memory:// keeps results in the memory of the process that stored them only"
    return None


def _check_broker_address(url: str, redis: bool, name: str = "CELERY_BROKER_URL") -> None:
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:  # "Invalid IPv6 URL": a '[' never closed (an address, or a password's)
        raise ConfigError(f"{name} cannot be read: a '[' is never closed {_BROKER_NOT_SHOWN}") from None
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range: its message quotes it (see _BROKER_NOT_SHOWN)
        port = -1
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"{name}'s port must be a number from 1 to 65535 {_BROKER_NOT_SHOWN}")
    if not redis:
        return
    if not _REDIS_DB.fullmatch(parts.path):
        # redis-py would quietly use database 0 where the workers' kombu refuses to start
        raise ConfigError(f"{name}'s path must be a Redis database number, as in /0 {_BROKER_NOT_SHOWN}")
    if name == "CELERY_BROKER_URL" and "db" in parse_qs(parts.query):
        # kombu passes the query's db on to redis-py's connection beside its own (a TypeError at the
        # first connection: no worker starts), where the lane's redis-py would write to that database.
        raise ConfigError(f"{name} gives the Redis database number as ?db=: put it in the path instead, as in "
                          f"redis://host:6379/3 {_BROKER_NOT_SHOWN}")
    from redis.connection import parse_url

    try:
        parse_url(url)  # the query's options (socket_timeout=...), as the lane will read them
    except ValueError as exc:  # "Invalid value for 'socket_timeout' in connection URL.": no value quoted
        raise ConfigError(f"{name} cannot be read: {exc}") from None


_URL_NOT_SHOWN = "(the value is not shown: it may hold a password)"


def _base_url(env: Mapping[str, str], name: str) -> str | None:
    """An http(s) base URL the product appends paths to (``/accounts/<id>/entitlements``, ``/v1/...``),
    None when blank. Refused at start, as the other URLs are, when no request could use it: the calls
    failed one by one instead (requests' MissingSchema or InvalidURL, taken for "no answer" and
    retried for ever; every bad-debt payment a 503). The error never quotes the value."""
    from urllib.parse import urlsplit

    url = env.get(name, "").strip()
    if not url:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:  # "Invalid IPv6 URL": a '[' never closed
        raise ConfigError(f"{name} cannot be read: a '[' is never closed {_URL_NOT_SHOWN}") from None
    if parts.scheme.lower() not in ("http", "https") or not url.partition("://")[1]:
        raise ConfigError(f"{name} must be an http:// or https:// URL, {_scheme_shown(url)}")
    if not parts.hostname:
        raise ConfigError(f"{name} names no host {_URL_NOT_SHOWN}")
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range: its message quotes it
        port = -1
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"{name}'s port must be a number from 1 to 65535 {_URL_NOT_SHOWN}")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ConfigError(f"{name} must be a base URL without a query or fragment: paths are appended to it "
                          f"{_URL_NOT_SHOWN}")
    return url


def worker_metrics_port(env: Mapping[str, str]) -> int | None:
    """WORKER_METRICS_PORT, the port of the worker's /metrics: None when unset or empty (no metrics
    served), 0 for any free port. A value that is no port number is a ConfigError naming it, refused
    at start (make run, dunning process worker, the worker itself): the worker logged an error and
    served no metrics, and nothing said so where it was started."""
    raw = str(env.get("WORKER_METRICS_PORT", "")).strip()
    if not raw:
        return None
    try:
        port = int(raw)  # as the worker binds it
    except ValueError:
        port = -1
    if not 0 <= port < 65536:
        raise ConfigError(f"WORKER_METRICS_PORT must be a port number, got {shown(raw)}")
    return port


UNNAMED_SERVICE = "service"


def parse_service_tokens(raw: str) -> dict[str, str]:
    """``name:token,token2`` -> {token: name}: a token may name the service that holds it (the
    rollout audit records it); a bare token is ``service``'s."""
    return _parse_tokens(raw, "SERVICE_TOKENS", default_actor=UNNAMED_SERVICE)


def parse_support_tokens(raw: str) -> dict[str, str]:
    """``actor:token,actor2:token2`` -> {token: actor}. A token is one actor's: the audit log names
    whoever used it (the error names the actors, never the token)."""
    return _parse_tokens(raw, "SUPPORT_TOKENS")


def _control(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in text)


def _parse_tokens(raw: str, name: str, default_actor: str | None = None) -> dict[str, str]:
    return {token: actor for token, (actor, _entry) in _parse_token_entries(raw, name, default_actor).items()}


def _parse_token_entries(raw: str, name: str, default_actor: str | None = None) -> dict[str, tuple[str, int]]:
    """{token: (actor, entry)}, ``entry`` its position in ``raw``. No error shows any part of an entry,
    the actor included: a bare token holding a ':' is read as actor:token, so what reads as the actor
    may be the first part of a secret. Entries are named by their position."""
    tokens: dict[str, tuple[str, int]] = {}
    for entry, item in enumerate(raw.split(","), start=1):
        item = item.strip()
        if not item:
            continue
        actor, sep, token = item.partition(":")
        actor, token = actor.strip(), token.strip()
        if not sep and default_actor is not None:
            actor, token = default_actor, actor
        if not actor or not token:
            raise ConfigError(f"{name} entries must look like actor:token"
                              + (" or token" if default_actor is not None else "")
                              + f": entry {entry} has {'no actor' if not actor else 'no token'}")
        # Tokens one per line, or separated by spaces, were read as one token holding line breaks
        # or spaces, which no request can send (a header holds no line break, a bearer token no
        # space): every request was a 401.
        if _control(actor):
            raise ConfigError(f"{name} entry {entry} holds a line break or another control character: "
                              "separate the entries with commas")
        if _control(token) or any(c.isspace() for c in token):
            raise ConfigError(f"{name} entry {entry} holds a space, a line break or another control character in "
                              "its token, which no bearer token does: separate the entries with commas")
        other = tokens.get(token)
        if other is not None and other[0] != actor:
            raise ConfigError(f"{name} entries {other[1]} and {entry} give the same token to two actors: each actor "
                              "needs a token of their own (the audit log names the actor a token belongs to)")
        tokens.setdefault(token, (actor, entry))
    return tokens


def _visibility_timeout(env: Mapping[str, str]) -> int:
    raw = env.get("CELERY_VISIBILITY_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_VISIBILITY_TIMEOUT
    try:
        visibility = int(raw)
    except ValueError:
        raise ConfigError("CELERY_VISIBILITY_TIMEOUT must be a whole number of seconds") from None
    if visibility < MIN_VISIBILITY_TIMEOUT:
        raise ConfigError(
            f"CELERY_VISIBILITY_TIMEOUT must be at least {MIN_VISIBILITY_TIMEOUT} seconds, "
            f"got {cut(str(visibility))}: a task's message stays unacknowledged through its countdown "
            f"(MAX_COUNTDOWN, {MAX_TASK_COUNTDOWN} s), a wait "
            f"for a worker process behind a task at its hard time limit, and its own run (task_time_limit: what "
            f"is left of the timeout halved, at least {MIN_TASK_TIME_LIMIT} s); a shorter timeout makes Redis hand "
            f"a waiting or running task to a second worker")
    if visibility > MAX_VISIBILITY_TIMEOUT:
        raise ConfigError(
            f"CELERY_VISIBILITY_TIMEOUT must be at most {MAX_VISIBILITY_TIMEOUT} seconds (a day): the task of a "
            f"worker that dies comes back to another one only once it has passed")
    return visibility


DEFAULT_HISTORY_RETENTION_DAYS = 90
# The shortest the product itself needs is the rollout gate's health window, which the policy file
# sets (app/history/prune.py check_retention, run where the policy is loaded at start). A century is
# "keep it all": a longer value is a typo.
MIN_HISTORY_RETENTION_DAYS = 1
MAX_HISTORY_RETENTION_DAYS = 36_500


def _history_retention_days(env: Mapping[str, str]) -> int:
    raw = env.get("HISTORY_RETENTION_DAYS", "").strip()
    if not raw:
        return DEFAULT_HISTORY_RETENTION_DAYS
    try:
        days = int(raw)
    except ValueError:
        raise ConfigError(f"HISTORY_RETENTION_DAYS must be a whole number of days, got {shown(raw)}") from None
    if not MIN_HISTORY_RETENTION_DAYS <= days <= MAX_HISTORY_RETENTION_DAYS:
        raise ConfigError(f"HISTORY_RETENTION_DAYS must be from {MIN_HISTORY_RETENTION_DAYS} to "
                          f"{MAX_HISTORY_RETENTION_DAYS} days, got {cut(str(days))}")
    return days


def _secret(env: Mapping[str, str], name: str) -> str:
    """A Stripe secret, without the blanks around it: one read from a file (a mounted secret, `echo
    whsec_... > file`) ends in a newline, which made every genuine webhook's signature not match.
    Stripe's keys and signing secrets hold no whitespace: one inside is a pasting mistake."""
    value = env.get(name, "").strip()
    if any(c.isspace() for c in value):
        raise ConfigError(f"{name} holds whitespace inside it (Stripe's secrets have none; the value is not shown)")
    if not (value.isascii() and value.isprintable()):
        # An invisible character that is no blank (a byte-order mark, a file saved "UTF-8 with BOM";
        # a zero-width space, pasted from a web page) was kept: the webhook secret then matched no
        # genuine signature (every webhook a 400), the API key made every call fail as a network
        # error (it cannot go in a header), retried as one for ever.
        raise ConfigError(f"{name} holds a character that is not printable ASCII, such as a byte-order mark or a "
                          "zero-width space (Stripe's secrets have none; the value is not shown)")
    return value


def _secret_key(env: Mapping[str, str]) -> str:
    """SECRET_KEY without the blanks around it (one read from a file ends in a newline); unset or
    empty: a random key of this process's own (the Procfile's web line draws one before gunicorn
    forks, so its workers share it). Set but only blanks, it was taken as the key signing every
    support session, a key anyone can guess (the Procfile's ${SECRET_KEY:-...} keeps such a value):
    refused, never shown."""
    raw = env.get("SECRET_KEY", "")
    if not raw:
        return os.urandom(24).hex()
    value = raw.strip()
    if not value:
        raise ConfigError("SECRET_KEY is set but holds only blanks (spaces, tabs or line breaks): set a long random "
                          "value, or leave it unset or empty for a random key per web process")
    return value


@dataclass(frozen=True)
class Settings:
    database_url: str
    broker_url: str = DEFAULT_BROKER_URL
    result_backend: str | None = None
    stripe_webhook_secret: str = ""
    stripe_api_key: str = ""
    stripe_api_base: str | None = None
    account_management_url: str | None = None
    service_tokens: dict[str, str] = field(default_factory=dict)  # token -> service name
    support_tokens: Mapping[str, str] = field(default_factory=dict)
    policy_path: str | None = None
    secret_key: str = ""
    # Seconds a Redis-delivered message may stay unacknowledged before the broker hands it to
    # another worker. Every countdown in the project stays far below it (PITFALLS.md).
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT
    # Optional prefix for every Redis key of the broker (tests isolate their keyspace with it).
    broker_key_prefix: str | None = None
    # History rows older than this many days are removed (app/history/prune.py, hourly).
    history_retention_days: int = DEFAULT_HISTORY_RETENTION_DAYS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        db = env.get("DATABASE_URL", "").strip()
        if not db:
            raise ConfigError(
                "DATABASE_URL is not set (use `make run`, which starts a private PostgreSQL, "
                "or point it at a server: postgresql://user@host/db)"
            )
        broker = check_broker_url(env.get("CELERY_BROKER_URL", "").strip() or DEFAULT_BROKER_URL)
        visibility = _visibility_timeout(env)
        service_entries = _parse_token_entries(env.get("SERVICE_TOKENS", ""), "SERVICE_TOKENS",
                                               default_actor=UNNAMED_SERVICE)
        support_entries = _parse_token_entries(env.get("SUPPORT_TOKENS", ""), "SUPPORT_TOKENS")
        both = sorted((entry, service_entries[token][1]) for token, (_actor, entry) in support_entries.items()
                      if token in service_entries)
        if both:
            # A support token that is also a service token opens /ops and /pay-bad-debt, unaudited.
            support_entry, service_entry = both[0]
            raise ConfigError(f"SUPPORT_TOKENS entry {support_entry}'s token is also SERVICE_TOKENS entry "
                              f"{service_entry}'s: a token belongs to one of them only")
        service_tokens = {token: actor for token, (actor, _entry) in service_entries.items()}
        support_tokens = {token: actor for token, (actor, _entry) in support_entries.items()}
        return cls(
            database_url=normalize_database_url(db),
            broker_url=broker,
            result_backend=check_result_backend(env.get("CELERY_RESULT_BACKEND", "").strip() or None),
            stripe_webhook_secret=_secret(env, "STRIPE_WEBHOOK_SECRET"),
            stripe_api_key=_secret(env, "STRIPE_API_KEY"),
            stripe_api_base=_base_url(env, "STRIPE_API_BASE"),
            account_management_url=_base_url(env, "ACCOUNT_MANAGEMENT_URL"),
            service_tokens=service_tokens,
            support_tokens=support_tokens,
            policy_path=env.get("DUNNING_POLICY", "").strip() or None,
            secret_key=_secret_key(env),
            visibility_timeout=visibility,
            broker_key_prefix=env.get("CELERY_BROKER_KEY_PREFIX", "").strip() or None,
            history_retention_days=_history_retention_days(env),
        )

    def __repr__(self) -> str:
        # The dataclass repr showed every secret (DATABASE_URL's password, the Stripe keys, every
        # token) wherever a Settings is printed: pytest's assertion output in CI logs, a debugger, an
        # error report. Shown instead: where it connects, who holds a token, and whether each
        # secret is set.
        shown = {
            "database_url": _password_hidden(self.database_url),
            "broker_url": _password_hidden(self.broker_url),
            "result_backend": _password_hidden(self.result_backend) if self.result_backend else None,
            "stripe_webhook_secret": _set_or_not(self.stripe_webhook_secret),
            "stripe_api_key": _set_or_not(self.stripe_api_key),
            "stripe_api_base": self.stripe_api_base,
            "account_management_url": (_password_hidden(self.account_management_url)
                                       if self.account_management_url else None),
            "service_tokens": f"<tokens of {sorted(set(self.service_tokens.values()))}>",
            "support_tokens": f"<tokens of {sorted(set(self.support_tokens.values()))}>",
            "policy_path": self.policy_path,
            "secret_key": _set_or_not(self.secret_key),
            "visibility_timeout": self.visibility_timeout,
            "broker_key_prefix": self.broker_key_prefix,
            "history_retention_days": self.history_retention_days,
        }
        return "Settings(" + ", ".join(f"{name}={value!r}" for name, value in shown.items()) + ")"

    def with_overrides(self, **changes: object) -> Settings:
        from dataclasses import replace

        return replace(self, **changes)  # type: ignore[arg-type]


def _set_or_not(secret: str) -> str:
    return "<set>" if secret else "<not set>"


_PASSWORD_PARAMETER = re.compile(r"(?i)(\bpassword=)[^&]*")


def _password_hidden(url: str) -> str:
    """``url`` with the password of its user part and any ``password=`` parameter as ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<not a URL: not shown>"
    # Everything up to the last '@' but the user name: a password holding an unencoded '/', '?' or
    # '@' (which ends the URL's address early for a parser) is hidden all the same.
    userinfo, at, after = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = userinfo.split(":", 1)[0] + ":***@" + after
    return _PASSWORD_PARAMETER.sub(r"\1***", f"{scheme}://{rest}")
