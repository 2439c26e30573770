"""Fixtures: a real PostgreSQL database and Redis keyspace of our own, the real Flask app, a real
Celery worker on the real broker. See tests/servers.py for which servers are used."""

from __future__ import annotations

import gc
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Connection, Engine

from app import create_app
from app.config import Settings
from app.migrate import upgrade
from app.runtime import Runtime
from tasks.factory import make_celery
from tests import servers
from tests.stripe_events import body_and_headers, unique

WEBHOOK_SECRET = "whsec_test_" + uuid.uuid4().hex
SERVICE_TOKEN = "svc_" + uuid.uuid4().hex
SUPPORT_TOKEN = "sup_" + uuid.uuid4().hex
SUPPORT_ACTOR = "alice"

TABLES_TO_CLEAN = (
    "outbox, recompute_request, stripe_event, stripe_invoice, stripe_payment_attempt, stripe_subscription, "
    "stripe_payment_method, stripe_customer_state, payment_retry, bad_debt_payment, bad_debt_episode, "
    "subs_stuck_events, subs_mandate, subs_dunning, subs_customer, subs_account, sweep_run, drift_record, "
    "sweep_error, rollout_history, audit_log, redrive_cursor, stripe_pass_pause"
)


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[str]:
    """The run's PostgreSQL server (tests/servers.py chooses it), as its admin URL."""
    with servers.postgres_admin_url() as admin:
        yield admin


@pytest.fixture(scope="session")
def database_url(postgres_admin: str) -> Iterator[str]:
    with servers.test_database(postgres_admin) as url:
        upgrade(url)
        yield url


@pytest.fixture
def empty_database(postgres_admin: str) -> Iterator[str]:
    """A database of its own with no schema yet, on the run's server; dropped afterwards."""
    with servers.test_database(postgres_admin) as url:
        yield url


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    with servers.redis_url() as url:
        yield url


@pytest.fixture(scope="session")
def settings(database_url: str, broker_url: str) -> Settings:
    prefix = f"dunning-test-{uuid.uuid4().hex[:8]}:"
    return Settings(
        database_url=database_url,
        broker_url=broker_url,
        stripe_webhook_secret=WEBHOOK_SECRET,
        stripe_api_key="sk_test_" + uuid.uuid4().hex,
        service_tokens={SERVICE_TOKEN: "service"},
        support_tokens={SUPPORT_TOKEN: SUPPORT_ACTOR},
        secret_key=uuid.uuid4().hex,
        broker_key_prefix=prefix,
    )


@pytest.fixture(scope="session")
def runtime(settings: Settings) -> Iterator[Runtime]:
    rt = Runtime.build(settings)
    yield rt
    rt.engine.dispose()


@pytest.fixture(scope="session")
def engine(runtime: Runtime) -> Engine:
    return runtime.engine


@pytest.fixture(scope="session")
def celery_app(settings: Settings, runtime: Runtime) -> Iterator[Celery]:
    app = make_celery(settings)
    # The worker thread shares this process: give it the test runtime.
    from tasks import runtime as task_runtime

    task_runtime._RUNTIMES[id(app)] = runtime
    yield app
    # Task results the tests waited on unsubscribe from the result backend when collected: let
    # that happen now, while the broker still runs (a private one stops right after the session).
    gc.collect()
    _purge_prefix(settings)


def _purge_prefix(settings: Settings) -> None:
    import redis

    if not settings.broker_url.startswith("redis") or not settings.broker_key_prefix:
        return
    client = redis.Redis.from_url(settings.broker_url)
    keys = list(client.scan_iter(match=settings.broker_key_prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def flask_app(settings: Settings, runtime: Runtime, celery_app: Celery) -> Flask:
    app = create_app(settings, runtime=runtime, celery=celery_app)
    app.config["TESTING"] = True
    return app


@pytest.fixture
def client(flask_app: Flask) -> FlaskClient:
    return flask_app.test_client()


@pytest.fixture
def clean(engine: Engine, celery_app: Celery) -> Iterator[None]:
    """Empty queues and tables before an integration test.

    The session worker may still be finishing the previous test's task: purge first so nothing new
    starts, and retry the TRUNCATE when it collides with that last transaction.
    """
    from sqlalchemy.exc import OperationalError

    celery_app.control.purge()
    for attempt in range(5):
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(f"TRUNCATE {TABLES_TO_CLEAN} RESTART IDENTITY CASCADE")
            break
        except OperationalError:
            if attempt == 4:
                raise
    yield


@pytest.fixture
def conn(engine: Engine) -> Iterator[Connection]:
    """A connection inside a transaction that is rolled back after the test."""
    with engine.connect() as connection:
        trans = connection.begin()
        try:
            yield connection
        finally:
            trans.rollback()


@pytest.fixture(scope="session")
def worker(celery_app: Celery) -> Iterator[Any]:
    """A real Celery worker (in a thread of this process) consuming every queue on the real broker."""
    from celery.contrib.testing.worker import start_worker

    from tasks import queues

    with start_worker(celery_app, pool="solo", concurrency=1, perform_ping_check=False,
                      queues=list(queues.ALL), loglevel="WARNING", shutdown_timeout=30.0) as w:
        yield w


def _real_monotonic() -> float:
    """Seconds by the system's monotonic clock, which freezegun leaves alone: it freezes (and moves on
    with tick/move_to) time.monotonic, so a wait inside freeze_time never timed out, or a test moving
    frozen time on ended another thread's wait at once."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05,
             message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = _real_monotonic() + timeout
    pause = threading.Event()
    while True:
        value = predicate()
        if value:
            return value
        if _real_monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        pause.wait(interval)


class Accounts:
    """Creates accounts the way other teams do: only the contract columns."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, account_id: str | None = None, customer: str | None = None) -> tuple[str, str]:
        account_id = account_id or unique("acct")
        customer = customer or unique("cus")
        with self.engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO subs_account (account_id) VALUES (%(a)s)", {"a": account_id})
            conn.exec_driver_sql("INSERT INTO subs_customer (stripe_customer_id, account_id) VALUES (%(c)s, %(a)s)",
                                 {"c": customer, "a": account_id})
        return account_id, customer


@pytest.fixture
def accounts(engine: Engine, clean: None) -> Accounts:
    return Accounts(engine)


def post_event(client: FlaskClient, evt: dict[str, Any], secret: str = WEBHOOK_SECRET,
               timestamp: int | None = None) -> Any:
    body, headers = body_and_headers(evt, secret, timestamp)
    return client.post("/webhooks/stripe", data=body, headers=headers)


def service_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {SERVICE_TOKEN}"}


def point_stripe_at(runtime: Runtime, monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Send the session runtime's Stripe calls (web app and worker thread alike) to ``url``."""
    monkeypatch.setattr(runtime, "settings", runtime.settings.with_overrides(stripe_api_base=url))


@pytest.fixture
def fake_stripe(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A fake Stripe API server; the worker's runtime sends its Stripe calls there."""
    from tests.fakes.fake_stripe import FakeStripe

    with FakeStripe() as fake:
        point_stripe_at(runtime, monkeypatch, fake.url)
        yield fake


@pytest.fixture
def fake_am(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A fake Account Management server; the relay delivers there."""
    from tests.fakes.fake_account_management import FakeAccountManagement

    with FakeAccountManagement() as fake:
        monkeypatch.setattr(runtime, "settings", runtime.settings.with_overrides(account_management_url=fake.url))
        yield fake


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that use the session-scoped `worker` run after all others: once started, the worker keeps
    consuming, and tests that count queued messages must run before it exists."""
    items.sort(key=lambda item: "worker" in getattr(item, "fixturenames", ()))
