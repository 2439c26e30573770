"""DATABASE_URL, CELERY_BROKER_URL, CELERY_RESULT_BACKEND, ACCOUNT_MANAGEMENT_URL and STRIPE_API_BASE:
a malformed URL is a ConfigError at start that names the variable and what is wrong, never a
traceback or a failure on first use, and never quotes the URL (it may hold a password)."""

from __future__ import annotations

import pytest

from app.config import ConfigError, Settings

PASSWORD = "s3cr3t-pw"


def refused(**env: str) -> str:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"DATABASE_URL": "postgresql://nobody@127.0.0.1/x", **env})
    return str(err.value)


@pytest.mark.parametrize("url", [
    f"dunning:{PASSWORD}@db.internal:5432/dunning",          # the scheme forgotten
    f"postgresql//dunning:{PASSWORD}@db.internal/dunning",   # its ':' dropped
    f"postgresql:/dunning:{PASSWORD}@db.internal/dunning",   # one '/' dropped
    f"dunning:{PASSWORD}@db.internal://x",                   # what comes before '://' is no scheme
])
def test_a_database_url_without_a_scheme_is_refused_without_showing_it(url):
    """The error says the URL has no scheme; it never echoes the value, which holds the password."""
    message = refused(DATABASE_URL=url)
    assert "DATABASE_URL" in message and "has no scheme" in message
    assert PASSWORD not in message and "db.internal" not in message


def test_a_database_url_of_another_driver_names_its_scheme_only():
    message = refused(DATABASE_URL=f"postgresql+asyncpg://dunning:{PASSWORD}@db/x")
    assert "got the scheme 'postgresql+asyncpg'" in message and PASSWORD not in message


def test_a_port_that_is_not_a_number_is_refused_without_quoting_it():
    """An unencoded '@' in the password moves the rest of it into what the parser takes for the
    port: its own message (int()'s) would quote that part of the password."""
    message = refused(DATABASE_URL="postgresql://dunning:s3cr@et:pw-tail@db/x")
    assert "DATABASE_URL cannot be read: its port is not a number" in message and "%40" in message
    assert "pw-tail" not in message


@pytest.mark.parametrize("url", [f"postgresql://dunning:{PASSWORD}@db-1:5432,db-2:5432/x",
                                 f"postgresql://dunning:{PASSWORD}@db-1:5432,db-2/x?target_session_attrs=read-write"])
def test_libpq_s_multi_host_form_is_refused_for_what_it_is(url):
    """postgresql://h1:5432,h2:5432/db is libpq's own form (a Patroni or replica set's URL), which
    SQLAlchemy does not read: the error said the port was no number and to percent-encode an '@'
    of the password, sending the operator after the wrong thing."""
    message = refused(DATABASE_URL=url)
    assert message.startswith("DATABASE_URL names several hosts as libpq writes them")
    assert "?host=host1:5432&host=host2:5432" in message and PASSWORD not in message and "%40" not in message


@pytest.mark.parametrize(("url", "reason"), [
    ("postgresql://u@127.0.0.1:99999999999999999999/x", "port must be a number from 1 to 65535, got 9999"),
    ("postgresql://u@127.0.0.1:-1/x", "port must be a number from 1 to 65535, got -1"),
    ("postgresql://u@127.0.0.1:0/x", "port must be a number from 1 to 65535, got 0"),  # was 5432, unsaid
    ("postgresql://u@/x?host=h1:5432&host=h2:65536", "port must be a number from 1 to 65535, got 65536"),
    # the query's forms: SQLAlchemy renders no port for 0 either, so libpq used 5432 without a word
    ("postgresql://u@/x?host=h1:0", "port must be a number from 1 to 65535, got 0"),
    ("postgresql://u@/x?host=h1:00", "port must be a number from 1 to 65535, got 0"),
    ("postgresql://u@/x?host=h1:5432&host=h2:0", "port must be a number from 1 to 65535, got 0"),
    ("postgresql://u@/x?host=h1,h2&port=5432,0", "port must be a number from 1 to 65535, got 0"),
    ("postgresql://u@127.0.0.1/x?port=0", "port must be a number from 1 to 65535, got 0"),
    ("postgresql://u@127.0.0.1/x?port=abc", "DATABASE_URL cannot be read: Received non-integer port"),
    ("postgresql://u@127.0.0.1/x?sslmode=bogus", "sslmode must be one of disable, allow, prefer, require, "
                                                 "verify-ca, verify-full, got 'bogus'"),
    ("postgresql://u@127.0.0.1/x?connect_timeot=3", "an option PostgreSQL does not know: 'connect_timeot'"),
    ("postgresql://u@127.0.0.1/x?keepalives_idle=30s", "keepalives_idle must be a whole number, got '30s'"),
])
def test_a_port_out_of_range_or_an_option_libpq_would_refuse_is_refused_at_start(url, reason):
    """libpq checks a port's range and the options only when it connects: the first request (a 500)
    or command (a traceback) failed instead of the start."""
    message = refused(DATABASE_URL=url)
    assert message.startswith("DATABASE_URL") and reason in message, message


def test_an_option_error_never_shows_a_password_given_as_an_option():
    message = refused(DATABASE_URL=f"postgresql://u@h/x?password={PASSWORD}&connect_timeot=3")
    assert "connect_timeot" in message and PASSWORD not in message


@pytest.mark.parametrize("url", [
    "postgresql://u:pw@db:5432/x?sslmode=verify-full&connect_timeout=3&application_name=a&options=-c%20jit%3Doff",
    "postgresql://u@/x?host=h1:5432&host=h2:5433&target_session_attrs=read-write",
    "postgresql://u@/x?host=/var/run/postgresql",
    "postgresql:///x",
])
def test_well_formed_database_urls_are_taken_as_they_are(url):
    assert Settings.from_env({"DATABASE_URL": url}).database_url == url.replace("postgresql://",
                                                                                "postgresql+psycopg2://")


def test_the_cli_names_an_option_value_libpq_refused_when_it_connected():
    """The fallback for the values Settings does not check: libpq's reason, not a traceback."""
    import psycopg2
    from sqlalchemy.exc import OperationalError

    from app.cli import _known_problem

    refusal = psycopg2.OperationalError('invalid target_session_attrs value: "foo"\n')
    assert _known_problem(OperationalError("connect", {}, refusal)) == (
        'DATABASE_URL cannot be used: invalid target_session_attrs value: "foo"')
    assert _known_problem(psycopg2.OperationalError("server closed the connection unexpectedly")) is None


@pytest.mark.parametrize(("url", "reason"), [
    ("redis://127.0.0.1:abc/0", "port must be a number from 1 to 65535"),
    ("redis://127.0.0.1:65536/0", "port must be a number from 1 to 65535"),
    ("amqp://guest@rabbit:0//", "port must be a number from 1 to 65535"),
    (f"redis://:pa/{PASSWORD}@redis:6379/0", "port must be a number from 1 to 65535"),  # an unencoded '/'
    ("redis://redis:6379/zero", "path must be a Redis database number"),
    ("redis://redis:6379/0?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
    ("redis://redis:6379/0;redis://redis-2:port/0", "port must be a number from 1 to 65535"),
    # kombu hands the query's db to redis-py beside its own: a TypeError at the first connection
    ("redis://redis:6379?db=3", "put it in the path instead, as in redis://host:6379/3"),
    (f"redis://:{PASSWORD}@redis:6379/0?db=3", "put it in the path instead"),
    ("redis://redis:6379/0;redis://redis-2:6379?socket_timeout=5&db=1", "put it in the path instead"),
    ("memory://", "must be a Redis (redis://host:6379/0) or RabbitMQ (amqp://...) URL, got the scheme 'memory'"),
    (f"redis//:{PASSWORD}@redis:6379/0", "URL, but it has no scheme"),
    ("redis://:s3cr3t-pw@[::1/0", "a '[' is never closed"),
    ("amqp://guest:guest@[::1:5672//", "a '[' is never closed"),
    (f"redis://:pa[ss{PASSWORD}@redis:6379/0", "a '[' is never closed"),  # a password's unencoded '['
])
def test_a_broker_url_the_broker_clients_cannot_read_is_refused_at_start(url, reason):
    """It was taken as it was: the web stored a webhook, then failed to queue its recompute with a
    500 saying nothing was accepted, and the support button answered 500. The message names the
    variable, never its value (a password)."""
    message = refused(CELERY_BROKER_URL=url)
    assert message.startswith("CELERY_BROKER_URL") and reason in message, message
    assert PASSWORD not in message


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0", "rediss://:p%2Fw@redis:6380/3?ssl_cert_reqs=required", "redis://redis",
    "redis+socket:///run/redis.sock", "amqp://guest:guest@rabbit:5672//", "amqp://rabbit-1;amqp://rabbit-2:5673",
    "sentinel://s1:26379;sentinel://s2:26379",
])
def test_broker_urls_the_product_runs_on_are_taken_as_they_are(url):
    assert Settings.from_env({"DATABASE_URL": "postgresql://u@h/x", "CELERY_BROKER_URL": url}).broker_url == url


@pytest.mark.parametrize("broker", ["redis://redis-1:6379/2;redis://redis-2:6379/2",
                                    "rediss://:pw@redis-1:6380/0?ssl_cert_reqs=required;rediss://:pw@redis-2:6380/0"])
def test_a_failover_list_of_redis_brokers_keeps_results_on_its_first_server(broker):
    """With no CELERY_RESULT_BACKEND the results went to the broker's URL, the whole list, which
    Celery's Redis result backend cannot read (it took the rest for the database number): no worker
    started. The first server of the list keeps them; Celery builds that backend (nothing connects)."""
    from tasks.factory import celery_config, make_celery

    settings = Settings.from_env({"DATABASE_URL": "postgresql://u@h/x", "CELERY_BROKER_URL": broker})
    first = broker.split(";")[0]
    assert celery_config(settings)["result_backend"] == first
    backend = make_celery(settings).backend
    assert (backend.connparams["host"], backend.connparams["db"]) == ("redis-1", int(first.split("/")[3][:1]))


@pytest.mark.parametrize(("broker", "results"), [
    ("rediss://:pw@redis:6380/0", "rediss://:pw@redis:6380/0?ssl_cert_reqs=required"),
    ("rediss://redis:6380/1?socket_timeout=5;rediss://redis-2:6380/1",
     "rediss://redis:6380/1?socket_timeout=5&ssl_cert_reqs=required"),
    ("rediss://redis:6380/0?ssl_cert_reqs=none", "rediss://redis:6380/0?ssl_cert_reqs=none"),
])
def test_a_tls_redis_broker_keeps_results_on_a_url_celerys_result_backend_takes(broker, results):
    """Celery's Redis result backend refuses a rediss:// URL without ssl_cert_reqs (kombu takes it as
    the broker): with the broker's URL as the default result backend, no worker started."""
    from tasks.factory import celery_config, make_celery

    settings = Settings.from_env({"DATABASE_URL": "postgresql://u@h/x", "CELERY_BROKER_URL": broker})
    assert celery_config(settings)["result_backend"] == results
    assert make_celery(settings).backend.connparams["host"] == "redis"


def test_a_tls_redis_result_backend_without_ssl_cert_reqs_is_refused_at_start():
    message = refused(CELERY_RESULT_BACKEND=f"rediss://:{PASSWORD}@redis:6380/1")
    assert message.startswith("CELERY_RESULT_BACKEND") and "ssl_cert_reqs" in message and PASSWORD not in message


@pytest.mark.parametrize(("url", "reason"), [
    ("redis://127.0.0.1:abc/1", "port must be a number from 1 to 65535"),
    ("redis://redis:6379/results", "path must be a Redis database number"),
    (f"rediss://:{PASSWORD}@redis:6380/1?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
])
def test_a_redis_result_backend_redis_py_cannot_read_is_refused_at_start(url, reason):
    """The support button sends its task and then asks the result store to watch it: an unreadable
    one failed that second step with a 500 saying nothing was queued, for a task that was."""
    message = refused(CELERY_RESULT_BACKEND=url)
    assert message.startswith("CELERY_RESULT_BACKEND") and reason in message, message
    assert PASSWORD not in message


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/1", "db+postgresql+psycopg2://u@h/results",
                                 "cache+memcached://127.0.0.1:11211/"])
def test_result_backends_celery_reads_are_taken_as_they_are(url):
    settings = Settings.from_env({"DATABASE_URL": "postgresql://u@h/x", "CELERY_RESULT_BACKEND": url})
    assert settings.result_backend == url


@pytest.mark.parametrize("name", ["ACCOUNT_MANAGEMENT_URL", "STRIPE_API_BASE"])
@pytest.mark.parametrize(("url", "reason"), [
    ("account-management.internal", "must be an http:// or https:// URL"),  # no scheme: requests' MissingSchema
    ("ftp://account-management.internal", "must be an http:// or https:// URL, got the scheme 'ftp'"),
    (f"am:{PASSWORD}@account-management.internal", "must be an http:// or https:// URL, but it has no scheme"),
    ("http://", "names no host"),
    (f"http://am:{PASSWORD}@:8080/", "names no host"),
    (f"http://am:{PASSWORD}@account-management.internal:99999", "port must be a number from 1 to 65535"),
    ("http://account-management.internal:eighty", "port must be a number from 1 to 65535"),
    (f"http://am:{PASSWORD}@[::1", "cannot be read"),
    ("http://account-management.internal/?tenant=1", "without a query or fragment"),
    ("http://account-management.internal/#x", "without a query or fragment"),
])
def test_a_base_url_no_request_could_use_is_refused_at_start(name, url, reason):
    """Each was taken as it was: every call to Account Management then failed (requests'
    MissingSchema or InvalidURL, recorded as 'no answer' and retried for ever), and every bad-debt
    payment answered 503 'Stripe could not be asked (no answer)'."""
    message = refused(**{name: url})
    assert message.startswith(name) and reason in message, message
    assert PASSWORD not in message


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "https://account-management.example.internal/",
                                 f"http://am:{PASSWORD}@am.internal:443/base", "http://[::1]:12111",
                                 " http://am.internal\n"])
def test_base_urls_a_request_can_use_are_taken_as_they_are(url):
    settings = Settings.from_env({"DATABASE_URL": "postgresql://u@h/x", "ACCOUNT_MANAGEMENT_URL": url,
                                  "STRIPE_API_BASE": url})
    assert settings.account_management_url == url.strip() == settings.stripe_api_base


@pytest.mark.parametrize(("url", "reason"), [
    ("results", "names no result backend Celery has, but it has no scheme"),
    (f"resdis://:{PASSWORD}@redis:6379/1", "names no result backend Celery has, got the scheme 'resdis'"),
    (f"postgresql://u:{PASSWORD}@db/results", "names no result backend Celery has, got the scheme 'postgresql'"),
    (f"u:{PASSWORD}@redis:6379", "names no result backend Celery has, but it has no scheme"),
])
def test_a_result_backend_celery_has_no_backend_for_is_refused_at_start(url, reason):
    """Taken as it was: every worker then failed at its start (Celery's ImproperlyConfigured or
    ModuleNotFoundError traceback), the support button's result was never watched and its status
    answered 503 'unreachable' for ever."""
    message = refused(CELERY_RESULT_BACKEND=url)
    assert message.startswith("CELERY_RESULT_BACKEND") and reason in message, message
    assert PASSWORD not in message


@pytest.mark.parametrize(("url", "reason"), [
    ("rpc://", "rpc:// sends a task's result to the process that sent the task only"),
    (f"rpc://guest:{PASSWORD}@rabbit:5672//", "rpc:// sends a task's result to the process that sent the task only"),
    ("celery.backends.rpc:RPCBackend://", "rpc:// sends a task's result to the process that sent the task only"),
    ("disabled://", "disabled:// keeps no result"),
    ("cache+memory://", "cache+memory:// keeps results in the memory of the process that stored them only"),
])
def test_a_result_backend_other_processes_cannot_read_is_refused_at_start(url, reason):
    """With rpc:// a task's result goes to the reply queue of the web process that sent it: the support
    page's poll, served by another web worker (or the same one after a restart), saw PENDING for ever.
    Refused at start, naming the setting, why, and what to use instead."""
    message = refused(CELERY_RESULT_BACKEND=url)
    assert message.startswith("CELERY_RESULT_BACKEND") and reason in message, message
    assert "PENDING" in message and "redis://host:6379/1" in message and "leave it unset" in message
    assert PASSWORD not in message


def test_the_launcher_refuses_an_rpc_result_backend_before_anything_starts():
    """`dunning run` checks every process's settings once, before the private servers and the fleet."""
    from app.launcher import check_settings

    with pytest.raises(ConfigError, match="CELERY_RESULT_BACKEND rpc://"):
        check_settings({"CELERY_RESULT_BACKEND": "rpc://"})
