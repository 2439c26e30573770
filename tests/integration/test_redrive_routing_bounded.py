"""Beat's routing of unroutable events (app/redrive.py) at the shape a long-lived Stripe account gives
it: many events that never route (other products' customers, whom this fleet never maps), kept for
ever (stripe_event is never pruned). A tick read every one of them (0.4-0.5 s warm, 4.9 s cold at
50,000 in bench/periodic.py; the 10 s statement timeout at about 500,000), and its failure failed the
whole re-drive tick, the stale requests and due reviews with it.

What a tick reads is taken from the plans of the statements it runs (EXPLAIN ANALYZE of each, in a
savepoint rolled back just before the statement itself runs): the stripe_event rows their scans
returned or filtered out."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event
from sqlalchemy.exc import OperationalError

from app import redrive as redrive_module
from app.redrive import redrive
from tests.conftest import Accounts, post_event
from tests.integration.test_webhook_ingest import count, failed_invoice, queued
from tests.stripe_events import unique

NEVER_ROUTED = 20_000
WALK = 100  # a tick's share of them, for these tests
# The walk's share, the newest events, the mapped customer's: each found, then read again by the routing.
BOUND = 2 * (WALK + 50 + 10)


def _stripe_event_rows(node: dict[str, Any]) -> float:
    rows = 0.0
    if node.get("Relation Name") == "stripe_event":
        rows += (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
                 + node.get("Rows Removed by Index Recheck", 0)) * node.get("Actual Loops", 1)
    return rows + sum(_stripe_event_rows(child) for child in node.get("Plans", []))


class ReadCounter:
    """The stripe_event rows read by the re-drive's statements about unroutable events."""

    def __init__(self) -> None:
        self.rows = 0.0
        self.by_statement: list[tuple[float, str]] = []

    def __call__(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                 executemany: bool) -> None:
        if "stripe_event" not in statement or "unroutable" not in statement:
            return
        with cursor.connection.cursor() as probe:
            probe.execute("SAVEPOINT read_counter")
            probe.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters)
            plan = probe.fetchone()[0]
            probe.execute("ROLLBACK TO SAVEPOINT read_counter")
        plan = json.loads(plan) if isinstance(plan, str) else plan
        rows = _stripe_event_rows(plan[0]["Plan"])
        self.rows += rows
        self.by_statement.append((rows, " ".join(statement.split())[:60]))


@pytest.fixture
def reads(engine: Engine) -> Iterator[ReadCounter]:
    counter = ReadCounter()
    event.listen(engine, "before_cursor_execute", counter)
    try:
        yield counter
    finally:
        event.remove(engine, "before_cursor_execute", counter)


def tick(engine: Engine, celery_app: Any, reads: ReadCounter) -> tuple[dict[str, int], float]:
    reads.rows, reads.by_statement = 0.0, []
    result = redrive(engine, celery_app)
    return result, reads.rows


def _state(engine: Engine, event_id: str) -> tuple[str, str | None]:
    with engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT state, account_id FROM stripe_event WHERE id = %(i)s", {"i": event_id}).one()
        return row[0], row[1]


@pytest.fixture
def never_routed(client, accounts: Accounts, engine: Engine) -> dict[str, Any]:
    """NEVER_ROUTED events of customers nobody maps, received over the last days (one stored through
    the webhook, the others its copies under their own ids and customers), analysed as autovacuum
    would."""
    stranger = unique("cus")
    first = failed_invoice(stranger)
    assert post_event(client, first).json["state"] == "unroutable"
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO stripe_event (id, type, stripe_created, stripe_customer_id, trigger, state, raw_body, "
            "                          received_at) "
            "SELECT e.id || '_' || g, e.type, e.stripe_created, 'cus_stranger_' || g, e.trigger, e.state, e.raw_body, "
            "       now() - make_interval(days => 2, mins => g) "
            "  FROM stripe_event e, generate_series(1, %(n)s) g WHERE e.id = %(id)s",
            {"n": NEVER_ROUTED - 1, "id": first["id"]})
        conn.exec_driver_sql("UPDATE stripe_event SET received_at = now() - interval '3 days' WHERE id = %(id)s",
                             {"id": first["id"]})
        for table in ("stripe_event", "subs_customer", "stripe_invoice", "stripe_payment_attempt"):
            conn.exec_driver_sql(f"ANALYZE {table}")
    return first


def _old_unroutable(client, engine: Engine, customer: str) -> str:
    evt = failed_invoice(customer)
    assert post_event(client, evt).json["state"] == "unroutable"
    with engine.begin() as conn:  # it came days ago
        conn.exec_driver_sql("UPDATE stripe_event SET received_at = now() - interval '2 days 30 minutes' "
                             "WHERE id = %(id)s", {"id": evt["id"]})
    return str(evt["id"])


def test_a_tick_reads_a_bounded_share_of_the_events_that_never_route(
        client, accounts: Accounts, engine: Engine, celery_app, never_routed, reads, monkeypatch) -> None:
    """A tick reads the events of the customers just mapped, the newest events, and the next share of
    the others by a cursor going round, however many never route; a customer mapped now has its
    days-old event routed by the very next tick."""
    monkeypatch.setattr(redrive_module, "WALK_PER_TICK", WALK, raising=False)
    monkeypatch.setattr(redrive_module, "RECENT_PER_TICK", 50, raising=False)
    waiting = unique("cus")
    event_id = _old_unroutable(client, engine, waiting)
    redrive(engine, celery_app)  # a tick before the mapping
    assert _state(engine, event_id)[0] == "unroutable"

    account, _ = accounts.create(customer=waiting)  # another team maps it
    result, read = tick(engine, celery_app, reads)
    assert result["routed"] == 1 and _state(engine, event_id) == ("accepted", account)
    assert read <= BOUND, reads.by_statement  # not the NEVER_ROUTED + 1 events still unroutable
    for _ in range(3):
        result, read = tick(engine, celery_app, reads)
        assert result["routed"] == 0 and read <= BOUND, reads.by_statement


def test_a_mapping_committed_after_a_tick_had_passed_its_time_is_routed_by_the_next_tick(
        client, accounts: Accounts, engine: Engine, celery_app, never_routed, reads, monkeypatch) -> None:
    """created_at is the inserting transaction's start: another team's transaction that began two
    minutes ago and commits now leaves its row behind the cursor of a tick that ran meanwhile. The
    next tick still takes it (the last minutes' mappings are checked again), not the walk a round
    later."""
    monkeypatch.setattr(redrive_module, "WALK_PER_TICK", WALK, raising=False)
    monkeypatch.setattr(redrive_module, "RECENT_PER_TICK", 50, raising=False)
    late = unique("cus")
    event_id = _old_unroutable(client, engine, late)
    redrive(engine, celery_app)  # the cursor is past now
    account, _ = accounts.create(customer=late)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE subs_customer SET created_at = now() - interval '2 minutes' "
                             "WHERE stripe_customer_id = %(c)s", {"c": late})
    result, read = tick(engine, celery_app, reads)
    assert result["routed"] == 1 and _state(engine, event_id) == ("accepted", account)
    assert read <= BOUND, reads.by_statement


def test_a_mapping_the_new_customers_do_not_show_is_routed_when_the_walk_comes_by(
        client, accounts: Accounts, engine: Engine, celery_app, never_routed, monkeypatch) -> None:
    """A subs_customer row inserted with a created_at of long ago (a copy from another system) is not
    among the new mappings: the walk through the unroutable events routes its event all the same,
    within one round (each tick reading its share only: the test above). Nothing accepted is lost."""
    monkeypatch.setattr(redrive_module, "WALK_PER_TICK", 2000, raising=False)
    monkeypatch.setattr(redrive_module, "RECENT_PER_TICK", 50, raising=False)
    backdated = unique("cus")
    event_id = _old_unroutable(client, engine, backdated)
    redrive(engine, celery_app)
    account, _ = accounts.create(customer=backdated)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE subs_customer SET created_at = now() - interval '3 days' "
                             "WHERE stripe_customer_id = %(c)s", {"c": backdated})
    ticks = 0
    while _state(engine, event_id)[0] == "unroutable":
        ticks += 1
        assert ticks <= NEVER_ROUTED // 2000 + 2, "the walk went round without routing it"
        redrive(engine, celery_app)
    assert _state(engine, event_id) == ("accepted", account)
    assert count(engine, "SELECT count(*) FROM stripe_event WHERE state = 'unroutable'") == NEVER_ROUTED


def test_the_routing_failing_does_not_stop_the_stale_requests_nor_the_due_reviews(
        client, accounts: Accounts, engine: Engine, settings, celery_app, monkeypatch) -> None:
    """The routing's statement cancelled (as by the statement timeout) failed the whole tick before the
    stale-request and due-review re-drives of the same task: a lost recompute would never be sent
    again while it kept failing. They now run; the tick still fails (a stuck row, as any beat task's
    failure), once they are done."""
    stale_account, due_account = a_stale_request_and_a_due_review(accounts, engine)
    monkeypatch.setattr(redrive_module, "ROUTE_UNROUTABLE",
                        "DO $$ BEGIN RAISE query_canceled USING MESSAGE = "
                        "'canceling statement due to statement timeout'; END $$")

    with pytest.raises(OperationalError, match="statement timeout"):
        redrive(engine, celery_app)

    assert queued(settings) == 2  # the lost request sent again, the due review requested and sent
    assert count(engine, "SELECT count(*) FROM recompute_request WHERE account_id = %(a)s "
                         "AND requested_at > now() - interval '1 minute'", a=stale_account) == 1
    assert count(engine, "SELECT count(*) FROM recompute_request WHERE account_id = %(a)s "
                         "AND cause = 'review_due'", a=due_account) == 1


def a_stale_request_and_a_due_review(accounts: Accounts, engine: Engine) -> tuple[str, str]:
    """Two accounts for the tick's other re-drives: one whose request was lost 10 minutes ago, one
    whose review came due a minute ago."""
    stale_account, _ = accounts.create()
    due_account, _ = accounts.create()
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO recompute_request (account_id, trigger, cause, requested_at, touched_at) "
                             "VALUES (%(a)s, 'PAYMENT_FAILED', 'evt_lost', now() - interval '10 minutes', "
                             "        now() - interval '10 minutes')", {"a": stale_account})
        conn.exec_driver_sql("INSERT INTO subs_dunning (account_id, next_review_at) "
                             "VALUES (%(a)s, now() - interval '1 minute')", {"a": due_account})
    return stale_account, due_account
