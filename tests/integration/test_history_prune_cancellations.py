"""History retention keeps the delivered cancellations: the outbox relay reads them (1d24744,
app/outbox/relay.py _after_cancellation) before it sends an upgrade's revert, to never revert an
upgrade of a subscription whose cancellation Account Management took. Before, they went with the
rest of the delivered outbox HISTORY_RETENTION_DAYS after delivery: a revert the account asks for
later (its bad debt ended otherwise while the mirror still shows the subscription active, as it
does until the lifecycle workflow has cancelled it, at the period's end for an annual plan) was
sent after the cancellation, a request Account Management may refuse (a 4xx blocks the account's
later rows)."""

from __future__ import annotations

from datetime import datetime

from freezegun import freeze_time
from psycopg2.extras import Json
from sqlalchemy import Engine

from app.history.prune import count_due, prune
from app.outbox.relay import _after_cancellation
from tests.integration.test_history_prune import ANCIENT, DAYS, NOW, ids
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
