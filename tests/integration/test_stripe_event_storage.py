"""How stripe_event stores what every webhook writes (app/migrations/versions/stripe_event_lean_writes.py,
raw_body_storage_extended.py): only the raw body ever leaves the row, and indexes only for the states
the re-drives look up."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine

from app.migrate import downgrade, upgrade
from app.redrive import NEWLY_MAPPED, route_unroutable
from tests.stripe_events import event, unique
from webhooks import store
from webhooks.mirror import extract

REVISION_BEFORE = "history_retention"  # before stripe_event_lean_writes


@pytest.fixture
def migrated(empty_database: str) -> Iterator[tuple[str, Engine]]:
    upgrade(empty_database)
    engine = create_engine(empty_database)
    try:
        yield empty_database, engine
    finally:
        engine.dispose()


def _ingest(engine: Engine, customer: str, event_id: str | None = None) -> tuple[str, str]:
    """Store one invoice.payment_failed event through the ingest statement: (event id, raw body)."""
    raw = json.dumps(event("invoice.payment_failed", event_id=event_id, id=unique("in"), customer=customer))
    ex = extract(json.loads(raw))
    with engine.begin() as conn:
        store.ingest_events(conn, [(ex, raw)])
    return ex.event_id, raw


def _toasted_value_sizes(engine: Engine) -> list[int]:
    """The size of each value stripe_event keeps out of its rows (its chunks added up)."""
    with engine.connect() as conn:
        toast = conn.exec_driver_sql(
            "SELECT reltoastrelid::regclass::text FROM pg_class WHERE relname = 'stripe_event'").scalar_one()
        return [int(n) for (n,) in conn.exec_driver_sql(
            f"SELECT sum(length(chunk_data)) FROM {toast} GROUP BY chunk_id").all()]


def _indexes(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.exec_driver_sql(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'stripe_event'").all())


def test_only_the_raw_body_ever_leaves_the_row_and_an_event_id_stays_in_it(migrated: tuple[str, Engine]) -> None:
    # With the raw body STORAGE MAIN (stripe_event_lean_writes), the toaster moved every other text
    # column longer than a TOAST pointer out of the row first: a Stripe-length event id (28
    # characters) went to the TOAST table as a chunk of its own on every webhook.
    _url, engine = migrated
    ids = ["evt_1NG8Du2eZvKYlo2CUI79vXW" + str(n) for n in range(5)]  # Stripe's own length
    stored = [_ingest(engine, "cus_" + "N" * 24 + str(n), event_id) for n, event_id in enumerate(ids)]
    assert all(len(raw) > 4000 for _, raw in stored)  # the size of a real event
    toasted = _toasted_value_sizes(engine)
    assert len(toasted) <= len(stored) and all(size > 1000 for size in toasted), toasted  # bodies only, never an id
    with engine.connect() as conn:
        bodies: dict[str, str] = dict(conn.exec_driver_sql("SELECT id, raw_body FROM stripe_event").all())
        storage = conn.exec_driver_sql(
            "SELECT attstorage FROM pg_attribute WHERE attrelid = 'stripe_event'::regclass "
            "AND attname = 'raw_body'").scalar_one()
    assert bodies == dict(stored)  # byte for byte as it came
    assert storage == "x"  # extended: compressed first, and out of the row alone when still large


def test_stripe_event_is_indexed_only_for_the_re_driven_states(migrated: tuple[str, Engine]) -> None:
    _url, engine = migrated
    indexes = _indexes(engine)
    assert set(indexes) == {"pk_stripe_event", "ix_stripe_event_unroutable_customer", "ix_stripe_event_enqueue_failed",
                            # the routing's (migration unroutable_routing_cursor)
                            "ix_stripe_event_unroutable_received", "ix_stripe_event_unroutable_invoice",
                            "ix_stripe_event_unroutable_intent"}
    assert "(stripe_customer_id) WHERE (state = 'unroutable'::text)" in indexes["ix_stripe_event_unroutable_customer"]
    assert "(account_id) WHERE (state = 'enqueue_failed'::text)" in indexes["ix_stripe_event_enqueue_failed"]
    assert "(received_at, id) WHERE (state = 'unroutable'::text)" in indexes["ix_stripe_event_unroutable_received"]
    for name in ("ix_stripe_event_unroutable_invoice", "ix_stripe_event_unroutable_intent"):  # none for a routed event
        assert "WHERE ((state = 'unroutable'::text) AND " in indexes[name], indexes[name]


def test_the_unroutable_re_drive_finds_its_events_through_the_partial_index(migrated: tuple[str, Engine]) -> None:
    _url, engine = migrated
    customer = unique("cus")
    event_id, _raw = _ingest(engine, customer)  # no account maps the customer yet: unroutable
    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")  # as on a table too large to scan
        plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + NEWLY_MAPPED,
                                                             {"customers": [customer], "limit": 5000}).all())
        conn.exec_driver_sql("INSERT INTO subs_account (account_id) VALUES ('acct_lean')")
        conn.exec_driver_sql("INSERT INTO subs_customer (stripe_customer_id, account_id) VALUES (%s, 'acct_lean')",
                             (customer,))
        routed = route_unroutable(conn, 5000)
    scans = [line for line in plan.splitlines() if " on stripe_event " in line]
    assert scans and all("using ix_stripe_event_unroutable_" in line for line in scans), plan  # unroutable ones only
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
