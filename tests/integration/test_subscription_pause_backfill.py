"""Migration subscription_pause_backfill: the subscriptions mirrored before stripe_subscription.
collection_paused learn their pause of payment collection from the subscription events already
stored, merged as ingest merges them. An invoice Stripe marked uncollectible under a pause stored
before the release is then no debt at the next recompute (before: bad debt and the subscription
cancelled, until an event dated at or before the invoice said the pause); one marked after the pause
ended is still bad debt. A body Python cannot read is skipped, never stopping the deploy."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine

from app.db import make_engine
from app.migrate import downgrade, upgrade
from app.policy_file import load_policy
from app.recompute.service import run_recompute
from tests.conftest import wait_for
from tests.integration.migration_setup import upgrade_to_before
from tests.integration.test_collection_paused import DAY, PAUSED, finalized, marked, subscription_event
from tests.stripe_events import unique
from webhooks import store
from webhooks.mirror import extract

REVISION = "subscription_pause_backfill"


@pytest.fixture
def before(empty_database: str) -> Iterator[tuple[str, Engine, str]]:
    """A database at the revision before the backfill, and that revision."""
    previous = upgrade_to_before(empty_database, REVISION)
    engine = make_engine(empty_database)
    try:
        yield empty_database, engine, previous
    finally:
        engine.dispose()


def _as_previous_release(evt: dict[str, Any], raw: str | None = None) -> tuple[Any, str]:
    """The event as the release before collection_paused ingested it: its subscription row without
    the column (a new row gets '{}', an existing one keeps what it has)."""
    ex = extract(evt)
    rows = tuple(dataclasses.replace(r, values={k: v for k, v in r.values.items() if k != "collection_paused"},
                                     merge={}) if r.table == "stripe_subscription" else r for r in ex.rows)
    return dataclasses.replace(ex, rows=rows), raw if raw is not None else json.dumps(evt)


def _ingest(engine: Engine, *events: dict[str, Any] | tuple[dict[str, Any], str]) -> None:
    with engine.begin() as conn:
        for evt in events:
            item = _as_previous_release(*evt) if isinstance(evt, tuple) else _as_previous_release(evt)
            store.ingest_events(conn, [item])


def _account(engine: Engine) -> tuple[str, str]:
    account, customer = unique("acct"), unique("cus")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO subs_account (account_id) VALUES (%(a)s)", {"a": account})
        conn.exec_driver_sql("INSERT INTO subs_customer (stripe_customer_id, account_id) VALUES (%(c)s, %(a)s)",
                             {"c": customer, "a": account})
    return account, customer


def _paused(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.exec_driver_sql("SELECT id, collection_paused FROM stripe_subscription").all())


def _recompute(engine: Engine, account: str) -> dict[str, Any]:
    return run_recompute(engine, load_policy(), account, "MANUAL", datetime.now(UTC)).summary()


def test_subscriptions_mirrored_before_learn_their_pause_from_the_stored_events(
        before: tuple[str, Engine, str]) -> None:
    url, engine, previous = before
    t0 = int(datetime.now(UTC).timestamp()) - 30 * DAY
    paused_account, paused_customer = _account(engine)
    resumed_account, resumed_customer = _account(engine)
    paused_sub, resumed_sub, forgiven, debt = unique("sub"), unique("sub"), unique("in"), unique("in")
    # A body holding NaN (merchant metadata): Python reads it, a jsonb cast would refuse it.
    with_nan = subscription_event(paused_customer, paused_sub, t0, PAUSED)
    with_nan["data"]["object"]["metadata"] = {"score": float("nan")}
    unreadable = subscription_event(paused_customer, paused_sub, t0 + 2 * DAY, None)
    _ingest(engine,
            (with_nan, json.dumps(with_nan)),
            finalized(paused_customer, forgiven, paused_sub, t0 + DAY),
            marked(paused_customer, forgiven, paused_sub, t0 + DAY),
            # The renewal's update, still paused, dated a second after its invoice.
            subscription_event(paused_customer, paused_sub, t0 + DAY + 1, PAUSED),
            # Stored with a body nothing can read as JSON: skipped (its word, not paused, unknown).
            (unreadable, json.dumps(unreadable)[:-1] + ", NOT JSON"),
            subscription_event(resumed_customer, resumed_sub, t0, PAUSED),
            subscription_event(resumed_customer, resumed_sub, t0 + DAY, None),
            finalized(resumed_customer, debt, resumed_sub, t0 + 2 * DAY),
            marked(resumed_customer, debt, resumed_sub, t0 + 2 * DAY))
    assert _paused(engine) == {paused_sub: {}, resumed_sub: {}}

    assert upgrade(url) == []

    expected = {paused_sub: {str(t0): "mark_uncollectible", str(t0 + DAY + 1): "mark_uncollectible"},
                resumed_sub: {str(t0): "mark_uncollectible", str(t0 + DAY): None}}
    assert _paused(engine) == expected
    summary = _recompute(engine, paused_account)
    assert summary["status"] == "current" and summary["level"] == "none", summary
    assert "invoice.collection_paused" in [r["rule"] for r in summary["reasons"]], summary["reasons"]
    summary = _recompute(engine, resumed_account)
    assert summary["status"] == "bad_debt", summary
    with engine.connect() as conn:
        actions: dict[str, Any] = dict(conn.exec_driver_sql(
            "SELECT account_id, actions_requested FROM subs_dunning").all())
    assert actions == {paused_account: [], resumed_account: [f"cancel:{resumed_sub}"]}

    # Run again (and over what ingest merged since, in the same way): nothing changes.
    downgrade(url, previous)
    assert upgrade(url) == []
    assert _paused(engine) == expected


def test_the_backfill_merges_with_what_ingest_already_kept_as_ingest_does(before: tuple[str, Engine, str]) -> None:
    """A subscription whose newer event the new release already merged (a web process of this release
    during the deploy), and two events of one second that disagree: the union, not paused winning
    the second, as ingest's merge gives in any order."""
    url, engine, _previous = before
    t0 = int(datetime.now(UTC).timestamp()) - 30 * DAY
    _account_id, customer = _account(engine)
    sub = unique("sub")
    _ingest(engine, subscription_event(customer, sub, t0, PAUSED), subscription_event(customer, sub, t0 + DAY, None),
            subscription_event(customer, sub, t0 + DAY, PAUSED))
    newer = subscription_event(customer, sub, t0 + 2 * DAY, PAUSED)
    with engine.begin() as conn:  # this release's ingest
        store.ingest_events(conn, [(extract(newer), json.dumps(newer))])
    assert _paused(engine) == {sub: {str(t0 + 2 * DAY): "mark_uncollectible"}}

    assert upgrade(url) == []

    assert _paused(engine) == {sub: {str(t0): "mark_uncollectible", str(t0 + DAY): None,
                                     str(t0 + 2 * DAY): "mark_uncollectible"}}


def test_a_row_a_webhook_holds_is_merged_after_it_without_losing_the_webhooks_word(
        before: tuple[str, Engine, str]) -> None:
    """The batch never waits for a row another transaction holds (SKIP LOCKED: no deadlock with an
    ingest locking several rows); it merges that row afterwards, waiting for it alone, on top of what
    the webhook wrote."""
    url, engine, _previous = before
    t0 = int(datetime.now(UTC).timestamp()) - 30 * DAY
    _account_id, customer = _account(engine)
    held, free = unique("sub"), unique("sub")
    _ingest(engine, subscription_event(customer, held, t0, PAUSED), subscription_event(customer, free, t0, PAUSED))
    newer = subscription_event(customer, held, t0 + DAY, None)
    migration: list[Any] = []
    with engine.connect() as webhook:
        webhook.exec_driver_sql("BEGIN")
        webhook.exec_driver_sql("SELECT 1 FROM stripe_subscription WHERE id = %(id)s FOR UPDATE", {"id": held})
        thread = threading.Thread(target=lambda: migration.append(upgrade(url)))
        thread.start()
        try:
            # The free row is merged while the held one is still held; then the migration waits for it.
            wait_for(lambda: _paused(engine)[free] == {str(t0): "mark_uncollectible"}, message="the free row merged")
            wait_for(lambda: migration_waits(engine), message="the migration waiting for the held row")
            assert _paused(engine)[held] == {}
            store.ingest_events(webhook, [(extract(newer), json.dumps(newer))])
            webhook.exec_driver_sql("COMMIT")
        finally:
            webhook.exec_driver_sql("ROLLBACK")  # after a failure: let the migration end
            thread.join()
    assert migration == [[]]
    assert _paused(engine)[held] == {str(t0): "mark_uncollectible", str(t0 + DAY): None}


def migration_waits(engine: Engine) -> bool:
    with engine.connect() as conn:
        return bool(conn.exec_driver_sql(
            "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %(q)s "
            "AND datname = current_database() AND pid <> pg_backend_pid()", {"q": "%FOR UPDATE%"}).first())
