"""History retention keeps the delivered cancellations: the outbox relay reads them (1d24744,
app/outbox/relay.py _after_cancellation) before it sends an upgrade's revert, to never revert an
upgrade of a subscription whose cancellation Account Management took. Before, they went with the
rest of the delivered outbox HISTORY_RETENTION_DAYS after delivery: a revert the account asks for
later (its bad debt ended otherwise while the mirror still shows the subscription active, as it
does until the lifecycle workflow has cancelled it, at the period's end for an annual plan) was
sent after the cancellation, a request Account Management may refuse (a 4xx blocks the account's
later rows)."""

from __future__ import annotations

from datetime import datetime, timedelta

from freezegun import freeze_time
from psycopg2.extras import Json
from sqlalchemy import Engine

from app.history.prune import count_due, prune
from app.outbox.relay import _after_cancellation
from tests.integration.test_history_prune import ANCIENT, DAYS, NOW, OLD, ids
from tests.stripe_events import unique


def delivered(engine: Engine, account: str, event_type: str, payload: dict[str, str], at: datetime,
              state: str = "delivered") -> int:
    with engine.begin() as conn:
        return int(conn.exec_driver_sql(
            "INSERT INTO outbox (account_id, dunning_version, event_type, payload, created_at, next_attempt_at, "
            "delivered_at, state, attempts) VALUES (%(account)s, 1, %(type)s, %(payload)s, %(at)s, %(at)s, %(at)s, "
            "%(state)s, 1) RETURNING id",
            {"account": account, "type": event_type, "payload": Json(payload), "at": at, "state": state}).scalar_one())


def test_a_delivered_cancellation_outlives_the_retention_and_still_supersedes_a_revert(engine: Engine, runtime,
                                                                                        clean):
    account, subscription = unique("acct"), unique("sub")
    cancellation = delivered(engine, account, "CancellationRequested",
                             {"subscription_id": subscription, "reason": "bad_debt"}, ANCIENT)
    # What no one reads again goes as before: the account's other delivered rows, a cancellation
    # superseded or skipped (never taken by Account Management).
    entitlements = delivered(engine, account, "EntitlementsChanged", {"subscription_id": subscription}, ANCIENT)
    superseded = delivered(engine, account, "CancellationRequested", {"subscription_id": unique("sub")}, ANCIENT,
                           state="superseded")
    with freeze_time(NOW):
        assert count_due(engine, runtime.policy, DAYS).removed["outbox"] == 2
        report = prune(engine, runtime.policy, DAYS)
    assert report.removed["outbox"] == 2
    assert ids(engine, "outbox") == {cancellation}
    assert {entitlements, superseded}.isdisjoint(ids(engine, "outbox"))

    why = _after_cancellation(engine, account, "UpgradeRevertRequested",
                              {"subscription_id": subscription, "invoice_id": "in_upgrade"})
    assert why is not None and f"(outbox {cancellation})" in why


def _plan_nodes(node: dict) -> list[dict]:
    return [node, *(n for child in node.get("Plans", ()) for n in _plan_nodes(child))]


def test_a_prune_batch_does_not_read_the_delivered_cancellations_it_keeps(engine: Engine, clean):
    """The kept cancellations pile up for ever (a few per account that was ever in bad debt) and are
    the oldest delivered rows: a batch that walks the delivered rows by age from the oldest read all
    of them again, every batch of every prune, before the first row it removes."""
    from app.history.prune import BATCH_SIZE, HISTORIES, _delete_sql

    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO outbox (account_id, dunning_version, event_type, payload, created_at, next_attempt_at, "
            "delivered_at, state, attempts) SELECT 'acct_kept_' || g, 1, 'CancellationRequested', "
            "jsonb_build_object('subscription_id', 'sub_' || g), %(at)s, %(at)s, %(at)s, 'delivered', 1 "
            "FROM generate_series(1, 20000) g", {"at": ANCIENT})
        conn.exec_driver_sql(
            "INSERT INTO outbox (account_id, dunning_version, event_type, payload, created_at, next_attempt_at, "
            "delivered_at, state, attempts) SELECT 'acct_due_' || g, 1, 'EntitlementsChanged', '{}', "
            "%(at)s, %(at)s, %(at)s, 'delivered', 1 FROM generate_series(1, 10) g", {"at": OLD})
        conn.exec_driver_sql(
            "INSERT INTO outbox (account_id, dunning_version, event_type, payload, created_at, next_attempt_at, "
            "delivered_at, state, attempts) SELECT 'acct_recent_' || g, 1, 'EntitlementsChanged', '{}', "
            "%(at)s, %(at)s, %(at)s, 'delivered', 1 FROM generate_series(1, 30000) g", {"at": NOW})
        conn.exec_driver_sql("ANALYZE outbox")
    outbox = next(h for h in HISTORIES if h.table == "outbox")
    with engine.connect() as conn:
        trans = conn.begin()
        try:
            explained = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + _delete_sql(outbox),
                                             {"cutoff": NOW - timedelta(days=DAYS), "batch": BATCH_SIZE})
            plan = explained.scalar_one()[0]["Plan"]
        finally:
            trans.rollback()
    nodes = _plan_nodes(plan)
    assert plan["Actual Rows"] == 0 and any(n.get("Relation Name") == "outbox" for n in nodes)
    read_for_nothing = sum(n.get("Rows Removed by Filter", 0) + n.get("Rows Removed by Index Recheck", 0)
                           for n in nodes)
    assert read_for_nothing == 0, plan
    assert max(n["Actual Rows"] for n in nodes if n.get("Relation Name") == "outbox"
               and n["Node Type"] != "ModifyTable") == 10, plan
