"""The outbox relay against a fake Account Management server: contract bodies, at-least-once in
version order per account, backoff with jitter, and an outage that never slows recomputes."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY

from app.domain.events import CancellationRequested, DunningEntered, EntitlementsChanged, UpgradeRevertRequested
from app.outbox.relay import _warn_not_relayed, relay, request_key
from app.recompute.emit import emit
from tests.conftest import service_headers, wait_for
from tests.fakes.server import Answer, FakeServer
from tests.integration.dunning_setup import dunning_row, failed_invoice, paid

pytestmark = pytest.mark.worker

LATER = timedelta(hours=1)  # a relay pass "later": every backoff has passed


def outbox(engine, account: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT * FROM outbox WHERE account_id = %(a)s ORDER BY id", {"a": account})
        return [dict(r) for r in rows.mappings()]


def write_events(engine, account: str, version: int, events: list[Any], at: datetime | None = None) -> None:
    with engine.begin() as conn:
        emit(conn, account, version, events, at or datetime.now(UTC))


def requesting(engine, account: str, *actions: str) -> None:
    """The account's current state asks for these lifecycle actions (what recompute stored)."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO subs_dunning (account_id, status, level, changed_at, actions_requested) "
            "VALUES (%(a)s, 'bad_debt', 'suspended', now(), %(actions)s) "
            "ON CONFLICT (account_id) DO UPDATE SET actions_requested = EXCLUDED.actions_requested",
            {"a": account, "actions": json.dumps(list(actions))})


def bad_debt_episode(engine, account: str, entered_at: str) -> None:
    """The account's open bad-debt episode began at ``entered_at``; the one open before (if any) ends."""
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE bad_debt_episode SET exited_at = %(at)s WHERE account_id = %(a)s "
                             "AND exited_at IS NULL", {"a": account, "at": entered_at})
        conn.exec_driver_sql("INSERT INTO bad_debt_episode (account_id, entered_at, reason) "
                             "VALUES (%(a)s, %(at)s, 'retries_exhausted')", {"a": account, "at": entered_at})


def test_contract_bodies_for_entitlements_cancellation_and_upgrade_revert(accounts, engine, fake_am):
    account, _ = accounts.create()
    requesting(engine, account, "cancel:sub_1", "revert:in_up")
    bad_debt_episode(engine, account, (datetime.now(UTC) - timedelta(days=1)).isoformat())
    write_events(engine, account, 1, [DunningEntered(unpaid_since=None, failure_class="permanent"),
                                      EntitlementsChanged(entitlements={"products": {"prod_core": "revoked"},
                                                                        "plan_changes": False})])
    write_events(engine, account, 2, [CancellationRequested(subscription_id="sub_1", reason="retries_exhausted"),
                                      UpgradeRevertRequested(invoice_id="in_up", subscription_id="sub_2")])
    report = relay(engine, fake_am.url)
    assert report.delivered == 4 and report.failed == 0

    rows = outbox(engine, account)
    assert all(r["delivered_at"] is not None for r in rows)
    put, cancel, revert = fake_am.for_account(account)  # DunningEntered is informational: no call
    assert (put.method, put.kind) == ("PUT", "entitlements")
    assert put.body == {"entitlements": {"products": {"prod_core": "revoked"}, "plan_changes": False},
                        "dunning_version": 1}
    assert (cancel.method, cancel.kind) == ("POST", "cancellations")
    assert cancel.body["subscription_id"] == "sub_1" and cancel.body["reason"] == "retries_exhausted"
    assert cancel.body["action"] == "cancel" and cancel.idempotency_key == f"outbox-{rows[2]['id']}"
    assert "dunning_version" not in cancel.body  # sent again under its key from a later version: same body
    assert revert.kind == "cancellations" and revert.body["action"] == "revert_upgrade"
    assert revert.body["invoice_id"] == "in_up" and revert.body["subscription_id"] == "sub_2"
    assert revert.idempotency_key == request_key("revert", account, "in_up")  # one per upgrade invoice

    assert relay(engine, fake_am.url).delivered == 0  # delivered rows are not sent again
    assert len(fake_am.for_account(account)) == 3


def test_a_cancellation_no_longer_requested_when_account_management_returns_is_not_sent(accounts, engine, fake_am):
    """Account Management down while the account enters bad debt and then pays: its cancellation
    waited in the outbox, and must not cancel a customer who has paid."""
    account, _ = accounts.create()
    requesting(engine, account, "cancel:sub_1")
    write_events(engine, account, 1, [CancellationRequested(subscription_id="sub_1", reason="retries_exhausted",
                                                            episode="2026-11-01T00:00:00+00:00")])
    write_events(engine, account, 2, [EntitlementsChanged(entitlements={"products": {"prod_core": "full"}})])
    requesting(engine, account)  # paid meanwhile: nothing requested any more
    report = relay(engine, fake_am.url)
    assert (report.delivered, report.superseded, report.failed) == (1, 1, 0)
    assert [r.kind for r in fake_am.for_account(account)] == ["entitlements"]
    cancel_row = outbox(engine, account)[0]
    assert cancel_row["delivered_at"] is not None and "superseded: cancel:sub_1" in cancel_row["last_error"]


def test_one_episodes_cancellation_requested_again_is_the_same_request(accounts, engine, fake_am):
    """Lifting takes the cancellation away and a failed payment brings it back: a second row, but
    Account Management must see the same request (one idempotency key), not a second cancellation."""
    account, _ = accounts.create()
    requesting(engine, account, "cancel:sub_1")
    episode = "2026-11-01T00:00:00+00:00"
    bad_debt_episode(engine, account, episode)
    write_events(engine, account, 1, [CancellationRequested(subscription_id="sub_1", reason="x", episode=episode)])
    assert relay(engine, fake_am.url).delivered == 1
    write_events(engine, account, 3, [CancellationRequested(subscription_id="sub_1", reason="x", episode=episode)])
    assert relay(engine, fake_am.url).delivered == 1
    next_episode = "2026-11-20T00:00:00+00:00"  # paid, and in bad debt again later
    bad_debt_episode(engine, account, next_episode)
    write_events(engine, account, 9, [CancellationRequested(subscription_id="sub_1", reason="x", episode=next_episode)])
    assert relay(engine, fake_am.url).delivered == 1
    first, again, next_one = (r.idempotency_key for r in fake_am.for_account(account))
    assert first == again == request_key("cancel", account, "sub_1", episode)
    assert next_one == request_key("cancel", account, "sub_1", next_episode)


def test_an_ended_episodes_cancellation_is_not_sent_beside_the_open_episodes(accounts, engine, fake_am):
    """Account Management down while episode E1 asks to cancel sub_1, the account pays (E1 ends) and
    a new episode E2 asks to cancel sub_1 again: when it returns, only E2's request goes (under E2's
    key), not a second cancellation under E1's."""
    account, _ = accounts.create()
    first, second = "2026-11-01T00:00:00+00:00", "2026-11-20T00:00:00+00:00"
    bad_debt_episode(engine, account, first)
    write_events(engine, account, 1, [CancellationRequested(subscription_id="sub_1", reason="retries_exhausted",
                                                            episode=first)])
    write_events(engine, account, 2, [EntitlementsChanged(entitlements={"products": {"prod_core": "full"}})])
    bad_debt_episode(engine, account, second)
    write_events(engine, account, 5, [CancellationRequested(subscription_id="sub_1", reason="marked_uncollectible",
                                                            episode=second)])
    requesting(engine, account, "cancel:sub_1")  # the current state: E2 asks to cancel sub_1
    report = relay(engine, fake_am.url)
    assert (report.delivered, report.superseded, report.failed) == (2, 1, 0)
    (cancel,) = [r for r in fake_am.for_account(account) if r.kind == "cancellations"]
    assert cancel.idempotency_key == request_key("cancel", account, "sub_1", second)
    assert cancel.body["reason"] == "marked_uncollectible"
    stale = outbox(engine, account)[0]
    assert stale["delivered_at"] is not None and f"episode {first}" in stale["last_error"]


def test_a_cancellation_without_an_open_episode_or_written_before_it_is_not_sent(accounts, engine, fake_am):
    """Rows written before cancellations named their episode: one written before the open episode
    began belongs to an earlier one. And with no episode open, no cancellation belongs to one."""
    account, _ = accounts.create()
    requesting(engine, account, "cancel:sub_1")
    began = datetime.now(UTC) - timedelta(days=1)
    write_events(engine, account, 1, [CancellationRequested(subscription_id="sub_1", reason="x")],
                 at=began - timedelta(days=30))
    write_events(engine, account, 2, [CancellationRequested(subscription_id="sub_1", reason="y")])
    write_events(engine, account, 3, [CancellationRequested(subscription_id="sub_1", reason="z",
                                                            episode=began.isoformat())])
    assert relay(engine, fake_am.url).superseded == 3  # no episode open
    assert fake_am.for_account(account) == []

    bad_debt_episode(engine, account, began.isoformat())
    write_events(engine, account, 4, [CancellationRequested(subscription_id="sub_1", reason="x")],
                 at=began - timedelta(days=30))
    write_events(engine, account, 5, [CancellationRequested(subscription_id="sub_1", reason="y")])
    write_events(engine, account, 6, [CancellationRequested(subscription_id="sub_1", reason="z",
                                                            episode=began.isoformat())])
    report = relay(engine, fake_am.url)
    assert (report.delivered, report.superseded) == (2, 1)
    assert [r.body["reason"] for r in fake_am.for_account(account)] == ["y", "z"]


def test_without_account_management_nothing_is_sent_and_the_warning_comes_once(accounts, engine, caplog):
    account, _ = accounts.create()
    write_events(engine, account, 1, [DunningEntered(unpaid_since=None, failure_class="permanent")])
    _warn_not_relayed.cache_clear()
    with caplog.at_level(logging.WARNING, logger="app.outbox.relay"):
        reports = [relay(engine, None) for _ in range(3)]  # beat, every few seconds
    assert all(r.delivered == 0 and r.failed == 0 for r in reports)
    assert [r["delivered_at"] for r in outbox(engine, account)] == [None]  # kept for when it is set
    warnings = [r.getMessage() for r in caplog.records if "ACCOUNT_MANAGEMENT_URL" in r.getMessage()]
    assert len(warnings) == 1


def test_an_accounts_backlog_stops_at_the_pass_deadline(accounts, engine, fake_am):
    """A slow Account Management must not hold the relay task for minutes on one account: the pass's
    deadline is checked before each row, and the rest waits for the next pass, in order."""
    import time

    import requests

    from app.outbox.relay import deliver_account

    account, _ = accounts.create()
    for version in (1, 2, 3):
        write_events(engine, account, version, [EntitlementsChanged(entitlements={"v": version})])
    with requests.Session() as session:
        spent = deliver_account(engine, session, fake_am.url, account, deadline=time.monotonic() - 1)
        assert (spent.delivered, spent.superseded) == (0, 0) and fake_am.for_account(account) == []
        went = deliver_account(engine, session, fake_am.url, account, deadline=time.monotonic() + 60)
    # Sent whole, the newest entitlements replace the older ones (test_outbox_stale_entitlements.py).
    assert (went.delivered, went.superseded) == (1, 2)
    assert [r.body["entitlements"]["v"] for r in fake_am.for_account(account)] == [3]


def test_a_failing_row_blocks_the_rows_behind_it_and_backs_off_with_jitter(accounts, engine, fake_am):
    blocked, _ = accounts.create()
    other, _ = accounts.create()
    # A lifecycle request between the entitlements: the older ones are not replaced by the newer.
    requesting(engine, blocked, "revert:in_up")
    write_events(engine, blocked, 1, [EntitlementsChanged(entitlements={"v": 1})])
    write_events(engine, blocked, 2, [UpgradeRevertRequested(invoice_id="in_up", subscription_id="sub_1")])
    write_events(engine, blocked, 3, [EntitlementsChanged(entitlements={"v": 3})])
    write_events(engine, other, 1, [EntitlementsChanged(entitlements={"v": 1})])

    fake_am.mode = "failing"  # 503
    before = datetime.now(UTC)
    report = relay(engine, fake_am.url)
    assert report.failed == 2 and report.delivered == 0
    first, second, third = outbox(engine, blocked)
    assert first["attempts"] == 1 and "HTTP 503" in first["last_error"]
    # backoff(0): between 1 and 2 seconds, jittered
    assert before + timedelta(seconds=1) <= first["next_attempt_at"] <= datetime.now(UTC) + timedelta(seconds=2)
    assert second["attempts"] == 0 and third["attempts"] == 0  # never tried before the first one
    assert fake_am.refused_with_5xx == 2

    # Right away nothing is ready (backing off); later everything goes, in version order.
    assert relay(engine, fake_am.url).accounts == 0
    fake_am.mode = "up"
    assert relay(engine, fake_am.url, now=datetime.now(UTC) + LATER).delivered == 4
    assert [r.body["dunning_version"] for r in fake_am.entitlements(blocked)] == [1, 3]
    assert [r.kind for r in fake_am.for_account(blocked)] == ["entitlements", "cancellations", "entitlements"]
    assert [r.body["dunning_version"] for r in fake_am.entitlements(other)] == [1]


def test_a_slow_account_management_times_out_and_never_slows_a_recompute(client, accounts, engine, worker,
                                                                           fake_am):
    account, customer = accounts.create()
    write_events(engine, account, 1, [EntitlementsChanged(entitlements={"v": 1})])
    recomputed: list[int] = []

    def meanwhile(_request: Any) -> None:
        # The relay waits on this very call (its read timeout far off): a webhook's recompute runs to
        # completion on the worker. Were the relay holding anything the recompute needs, this would
        # wait out the call's timeout and the call would fail.
        failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=1)
        recomputed.append(dunning_row(engine, account)["version"])

    fake_am.before_answer = meanwhile
    assert relay(engine, fake_am.url, timeout=(1.0, 60.0)).delivered == 1
    assert recomputed and recomputed[0] >= 1

    # Account Management slower than the read timeout: the call is cut and the row backs off.
    fake_am.before_answer = None
    fake_am.mode, fake_am.delay = "slow", 30.0
    assert relay(engine, fake_am.url, timeout=(1.0, 0.5)).failed == 1
    waiting = [r for r in outbox(engine, account) if r["delivered_at"] is None and r["attempts"]]
    assert len(waiting) == 1 and "Timeout" in waiting[0]["last_error"]


def test_account_management_down_never_stops_recomputes_and_the_backlog_drains_in_order(
        client, accounts, engine, worker, celery_app, fake_am):
    fake_am.down()
    ids = [accounts.create() for _ in range(2)]
    for account, customer in ids:
        invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=15)
        # A relay pass while it is down: every account's head row fails and backs off.
        assert relay(engine, fake_am.url).failed >= 1
        paid(client, engine, account, customer, invoice)  # recomputes go on: versions advance

    # Each account's next call fails again (the older entitlements ahead of it replaced, not sent).
    assert relay(engine, fake_am.url, now=datetime.now(UTC) + LATER).failed == 2
    for account, _ in ids:
        assert dunning_row(engine, account)["version"] >= 2
    # Informational rows ahead of the first call went; from the first call on, everything waits.
    pending = [r for account, _ in ids for r in outbox(engine, account) if r["delivered_at"] is None]
    assert pending and all(r["event_type"] != "DunningEntered" for r in pending)
    assert any(r["attempts"] >= 1 and "no answer" in r["last_error"] for r in pending)

    # The backlog is visible: the ops API and the gauge (set by the relay task on the worker).
    celery_app.send_task("tasks.relay_outbox")
    wait_for(lambda: REGISTRY.get_sample_value("dunning_outbox_backlog") == len(pending), message="backlog gauge")
    view = client.get("/ops/outbox", headers=service_headers())
    assert view.status_code == 200
    assert view.json["backlog"] == len(pending) and view.json["oldest_pending_age_seconds"] > 0
    assert view.json["accounts"] == 2 and view.json["oldest"][0]["id"] == min(r["id"] for r in pending)
    assert client.get("/ops/outbox").status_code == 401
    assert client.get("/ops/outbox?limit=abc", headers=service_headers()).status_code == 400

    # Account Management returns: the backlog drains, nothing lost, each account in version order.
    fake_am.up()
    wait_for(lambda: relay(engine, fake_am.url, now=datetime.now(UTC) + LATER) and all(
        r["delivered_at"] is not None for account, _ in ids for r in outbox(engine, account)), message="drained")
    for account, _ in ids:
        rows = outbox(engine, account)
        calls = [r for r in rows if r["event_type"] in ("EntitlementsChanged", "CancellationRequested",
                                                         "UpgradeRevertRequested") and r["state"] == "delivered"]
        received = fake_am.for_account(account)
        assert [r.idempotency_key for r in received] == [f"outbox-{r['id']}" for r in calls]
        # The customer paid while Account Management was down: the restriction written before is
        # replaced by the paid entitlements, the only ones it receives.
        final = dunning_row(engine, account)
        assert [r.body["entitlements"] for r in fake_am.entitlements(account)] == [final["entitlements"]]
        assert any(r["event_type"] == "EntitlementsChanged" and r["state"] == "superseded" for r in rows)
    assert client.get("/ops/outbox", headers=service_headers()).json["backlog"] == 0


def test_one_account_can_be_delivered_by_its_own_task(accounts, engine, worker, celery_app, fake_am):
    account, _ = accounts.create()
    write_events(engine, account, 1, [EntitlementsChanged(entitlements={"products": {"prod_core": "full"}})])
    celery_app.send_task("tasks.deliver_account_outbox", [account])
    (put,) = wait_for(lambda: fake_am.entitlements(account), message="delivered by deliver_account_outbox")
    assert put.body["dunning_version"] == 1
    wait_for(lambda: outbox(engine, account)[0]["delivered_at"] is not None, message="marked delivered")


def test_an_error_reply_postgresql_cannot_store_is_still_recorded_and_other_accounts_go_on(accounts, engine,
                                                                                        fake_am):
    """A proxy in front of Account Management answers one account with a NUL byte in its body: the
    failure is recorded all the same (a text column takes no NUL), so the row backs off and the
    next account's row, which Account Management takes, is delivered."""
    poison, _ = accounts.create()
    other, _ = accounts.create()
    write_events(engine, poison, 1, [EntitlementsChanged(entitlements={"v": 1})])  # first in line
    write_events(engine, other, 1, [EntitlementsChanged(entitlements={"v": 1})])
    fake_am.answer_raw(poison, 502, b"bad gateway\x00\xed\xa0\x80" + b"x" * 5000)
    now = datetime.now(UTC) + LATER
    report = relay(engine, fake_am.url, now=now)
    assert (report.delivered, report.failed) == (1, 1)
    (row,) = outbox(engine, poison)
    assert row["delivered_at"] is None and row["attempts"] == 1
    assert row["last_error"].startswith("HTTP 502: bad gateway") and "\x00" not in row["last_error"]
    assert len(row["last_error"]) <= 2000
    assert now + timedelta(seconds=1) <= row["next_attempt_at"] <= now + timedelta(seconds=2)  # backoff(0)
    assert [r.body["dunning_version"] for r in fake_am.entitlements(other)] == [1]


def test_an_unexpected_error_on_one_account_sets_it_aside_and_the_pass_goes_on(accounts, engine, fake_am, caplog):
    """A row nobody foresaw (here a payload that is not an object) makes delivering its account
    raise: the pass logs it, pushes that account back with backoff and delivers the others; it is
    never first in line again at once, so it cannot starve them."""
    poison, _ = accounts.create()
    others = [accounts.create()[0] for _ in range(2)]
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO outbox (account_id, dunning_version, event_type, payload) "
                             "VALUES (%(a)s, 1, 'EntitlementsChanged', '[1]')", {"a": poison})
    for account in others:
        write_events(engine, account, 1, [EntitlementsChanged(entitlements={"v": 1})])
    now = datetime.now(UTC) + LATER
    with caplog.at_level(logging.ERROR, logger="app.outbox.relay"):
        report = relay(engine, fake_am.url, now=now)
    assert (report.delivered, report.failed) == (2, 1) and "AttributeError" in report.errors[0]
    assert any(poison in r.getMessage() for r in caplog.records)
    assert all(len(fake_am.entitlements(account)) == 1 for account in others)
    (row,) = outbox(engine, poison)
    assert row["delivered_at"] is None and row["attempts"] == 1 and "AttributeError" in row["last_error"]
    assert now + timedelta(seconds=1) <= row["next_attempt_at"] <= now + timedelta(seconds=2)  # backoff(0)

    write_events(engine, others[0], 2, [EntitlementsChanged(entitlements={"v": 2})])
    assert relay(engine, fake_am.url, now=now).accounts == 1  # the poison account waits its backoff
    assert [r.body["dunning_version"] for r in fake_am.entitlements(others[0])] == [1, 2]
    later = relay(engine, fake_am.url, now=now + LATER)  # tried again later, set aside again
    assert later.failed == 1 and outbox(engine, poison)[0]["attempts"] == 2


@pytest.mark.parametrize("meanwhile", ["paid", "paid_and_in_bad_debt_again"])
def test_a_cancellation_taken_away_while_the_rows_ahead_of_it_are_sent_is_not_sent(accounts, engine, fake_am,
                                                                                  meanwhile):
    """The account's state is read again right before each lifecycle request: while Account
    Management takes its time with the rows ahead, the customer pays (the cancellation is no longer
    requested), or pays and falls into a new episode that asks for it again under its own key."""
    account, _ = accounts.create()
    episode = "2026-11-01T00:00:00+00:00"
    requesting(engine, account, "cancel:sub_1")
    bad_debt_episode(engine, account, episode)
    write_events(engine, account, 1, [EntitlementsChanged(entitlements={"products": {"prod_core": "revoked"}})])
    write_events(engine, account, 2, [CancellationRequested(subscription_id="sub_1", reason="retries_exhausted",
                                                            episode=episode)])

    def payment_meanwhile(request: Any) -> None:
        fake_am.before_answer = None  # once, while the first row waits for its answer
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE bad_debt_episode SET exited_at = now() WHERE account_id = %(a)s",
                                 {"a": account})
        if meanwhile == "paid":
            requesting(engine, account)
        else:
            bad_debt_episode(engine, account, "2026-11-20T00:00:00+00:00")

    fake_am.before_answer = payment_meanwhile
    report = relay(engine, fake_am.url)
    assert (report.delivered, report.superseded, report.failed) == (1, 1, 0)
    assert [r.kind for r in fake_am.for_account(account)] == ["entitlements"]
    assert "superseded: cancel:sub_1" in outbox(engine, account)[1]["last_error"]


def test_a_redirect_is_not_followed_and_the_row_is_retried_with_its_location_recorded(accounts, engine):
    """Rule (DESIGN 11): 2xx means done, anything else is retried with backoff; a 3xx too. Followed,
    a 301 turns the cancellation's POST into a GET without a body, whose 200 would mark the request
    delivered though nothing was cancelled. The Location is kept on the row for an operator: a
    redirect means ACCOUNT_MANAGEMENT_URL is misconfigured (an http:// URL moved to https://...)."""
    account, _ = accounts.create()
    requesting(engine, account, "cancel:sub_1")
    episode = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    bad_debt_episode(engine, account, episode)
    write_events(engine, account, 1, [CancellationRequested(subscription_id="sub_1", reason="retries_exhausted",
                                                            episode=episode)])
    seen: list[tuple[str, str]] = []

    def moved(method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        seen.append((method, path))
        if path.startswith("/accounts/"):
            return 301, {"Location": "/v2" + path}, {"moved": True}
        return 200, {}, {"data": []}  # what a GET at the new location would answer

    server = FakeServer(moved).start()
    try:
        report = relay(engine, server.url)
    finally:
        server.stop()
    assert [method for method, _ in seen] == ["POST"]  # the redirect was not followed
    assert report.delivered == 0 and report.failed == 1
    (row,) = outbox(engine, account)
    assert row["delivered_at"] is None and row["attempts"] == 1
    assert "HTTP 301" in row["last_error"] and f"/v2/accounts/{account}/cancellations" in row["last_error"]


def test_the_pass_finds_undelivered_rows_without_reading_the_delivered_history(engine):
    """Delivered rows are kept: with a long history the pass walked the primary key through every one
    of them before the first undelivered row (300 ms a pass at a million, every 5 s)."""
    from app.outbox.relay import READY_ACCOUNTS_SQL

    plan = plan_over_delivered_history(engine, "acct_hist_", 500, READY_ACCOUNTS_SQL,
                                       {"now": datetime.now(UTC), "limit": 500})
    assert "ix_outbox_pending_by_id" in plan, plan


def plan_over_delivered_history(engine, prefix: str, accounts: int, sql: str, params: dict[str, Any]) -> str:
    """The plan of ``sql`` over 50,000 delivered rows of ``accounts`` accounts and 20 undelivered ones
    (accounts ``prefix``1-20), analysed as a long-lived outbox is; the rows are removed after."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO outbox (account_id, dunning_version, event_type, payload, delivered_at, state) "
            "SELECT %(p)s || mod(g, %(n)s), g, 'EntitlementsChanged', '{}', now(), 'delivered' "
            "FROM generate_series(1, 50000) g", {"p": prefix, "n": accounts})
        conn.exec_driver_sql(
            "INSERT INTO outbox (account_id, dunning_version, event_type, payload) "
            "SELECT %(p)s || g, 50000 + g, 'EntitlementsChanged', '{}' FROM generate_series(1, 20) g", {"p": prefix})
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE outbox")
            return "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql, params))
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM outbox WHERE account_id LIKE %(p)s", {"p": prefix + "%"})

