"""How stripe_event stores what every webhook writes (app/migrations/versions/stripe_event_lean_writes.py):
the raw body compressed in the row rather than in TOAST chunks, and indexes only for the states the
re-drives look up."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine

from app.migrate import downgrade, upgrade
from app.redrive import ROUTE_UNROUTABLE
from tests.stripe_events import event, unique
from webhooks import store
from webhooks.mirror import extract

REVISION_BEFORE = "history_retention"


@pytest.fixture
def migrated(empty_database: str) -> Iterator[tuple[str, Engine]]:
    upgrade(empty_database)
    engine = create_engine(empty_database)
    try:
        yield empty_database, engine
    finally:
        engine.dispose()


def _ingest(engine: Engine, customer: str) -> tuple[str, str]:
    """Store one invoice.payment_failed event through the ingest statement: (event id, raw body)."""
    raw = json.dumps(event("invoice.payment_failed", id=unique("in"), customer=customer))
    ex = extract(json.loads(raw))
    with engine.begin() as conn:
        store.ingest_events(conn, [(ex, raw)])
    return ex.event_id, raw


def _toast_bytes(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(
            "SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE relname = 'stripe_event'").scalar_one())


def _indexes(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.exec_driver_sql(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'stripe_event'").all())


def test_a_raw_body_is_kept_compressed_in_its_row_not_in_toast_chunks(migrated: tuple[str, Engine]) -> None:
    _url, engine = migrated
    stored = [_ingest(engine, unique("cus")) for _ in range(5)]
    assert all(len(raw) > 4000 for _, raw in stored)  # the size a real event has: beyond what fits uncompressed
    assert _toast_bytes(engine) == 0
    with engine.connect() as conn:
        bodies: dict[str, str] = dict(conn.exec_driver_sql("SELECT id, raw_body FROM stripe_event").all())
    assert bodies == dict(stored)  # byte for byte as it came


def test_stripe_event_is_indexed_only_for_the_re_driven_states(migrated: tuple[str, Engine]) -> None:
    _url, engine = migrated
    indexes = _indexes(engine)
    assert set(indexes) == {"pk_stripe_event", "ix_stripe_event_unroutable_customer", "ix_stripe_event_enqueue_failed"}
    assert "(stripe_customer_id) WHERE (state = 'unroutable'::text)" in indexes["ix_stripe_event_unroutable_customer"]
    assert "(account_id) WHERE (state = 'enqueue_failed'::text)" in indexes["ix_stripe_event_enqueue_failed"]


def test_the_unroutable_re_drive_finds_its_events_through_the_partial_index(migrated: tuple[str, Engine]) -> None:
    _url, engine = migrated
    customer = unique("cus")
    event_id, _raw = _ingest(engine, customer)  # no account maps the customer yet: unroutable
    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")  # as on a table too large to scan
        plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + ROUTE_UNROUTABLE).all())
        conn.exec_driver_sql("INSERT INTO subs_account (account_id) VALUES ('acct_lean')")
        conn.exec_driver_sql("INSERT INTO subs_customer (stripe_customer_id, account_id) VALUES (%s, 'acct_lean')",
                             (customer,))
        routed = conn.exec_driver_sql(ROUTE_UNROUTABLE).all()
    assert "ix_stripe_event_unroutable_customer" in plan
    assert [(account, event) for account, _trigger, event in routed] == [("acct_lean", event_id)]


def test_the_migration_goes_down_and_up_again(migrated: tuple[str, Engine]) -> None:
    url, engine = migrated
    downgrade(url, REVISION_BEFORE)
    assert set(_indexes(engine)) == {"pk_stripe_event", "ix_stripe_event_stripe_customer_id",
                                     "ix_stripe_event_account_id", "ix_stripe_event_unroutable"}
    with engine.connect() as conn:
        storage = conn.exec_driver_sql(
            "SELECT attstorage FROM pg_attribute WHERE attrelid = 'stripe_event'::regclass "
            "AND attname = 'raw_body'").scalar_one()
    assert storage == "x"  # extended: compressed, and out of the row when large
    upgrade(url)
    assert "ix_stripe_event_enqueue_failed" in _indexes(engine)
