"""Fixtures of the integration tests: the fake Stripe the bad-debt payment's tests pay through, an
account in bad debt, a worker's engine of one pooled connection."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine

from app.db import make_engine
from app.runtime import Runtime
from tests.conftest import Accounts, point_stripe_at
from tests.fakes.fake_stripe_payments import FakeStripePayments
from tests.integration.bad_debt_setup import InBadDebt, into_bad_debt


@pytest.fixture
def stripe_fake(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeStripePayments]:
    """The fake Stripe for the web app and the worker (both read the session runtime's settings)."""
    with FakeStripePayments() as fake:
        point_stripe_at(runtime, monkeypatch, fake.url)
        yield fake


@pytest.fixture
def debtor(client: FlaskClient, engine: Engine, runtime: Runtime, accounts: Accounts,
           stripe_fake: FakeStripePayments) -> InBadDebt:
    debt = into_bad_debt(client, engine, runtime, accounts)
    stripe_fake.add_invoice(debt.invoice_object)
    return debt


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, settings) -> None:
    """The environment an operator's `dunning` command reads, pointed at the test's servers (for
    in-process calls of app.cli.main)."""
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("CELERY_BROKER_URL", settings.broker_url)
    monkeypatch.setenv("CELERY_BROKER_KEY_PREFIX", settings.broker_key_prefix or "")
    monkeypatch.delenv("DUNNING_POLICY", raising=False)


@pytest.fixture
def locking(database_url: str) -> Iterator[Engine]:
    """One worker's engine: a pool of one connection, as a prefork child keeps it between tasks (a
    session lock left on it would be kept for the worker's next task)."""
    engine = make_engine(database_url, pool_size=1, max_overflow=0)
    try:
        yield engine
    finally:
        engine.dispose()
