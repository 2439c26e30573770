"""The support page shows the account's calls to Account Management that have not gone: a row Account
Management refused as wrong (blocked), a cancellation held while the customer pays the bad debt, and
the rows waiting behind them, with their last answer. Support is who the customer calls when access
was withheld; before, only the ops endpoints and `dunning outbox list` showed these rows."""

from __future__ import annotations

from datetime import UTC, datetime

from markupsafe import escape

from app.domain.events import EntitlementsChanged
from app.outbox.relay import relay
from tests.conftest import SUPPORT_TOKEN
from tests.integration.test_outbox_relay import (
    LATER,
    outbox,
    plan_over_delivered_history,
    write_events,
)
from tests.integration.test_outbox_stale_entitlements import cancellation_in_bad_debt, pay_bad_debt

SUPPORT = {"Authorization": f"Bearer {SUPPORT_TOKEN}"}
MARKUP = '<img src=x onerror="alert(1)">'


def entitlements(engine, account: str, version: int, **products: str) -> None:
    write_events(engine, account, version, [EntitlementsChanged(entitlements={"products": products})])


def test_a_refused_row_is_shown_blocked_with_its_answer_escaped(client, accounts, engine, fake_am):
    account, _ = accounts.create()
    other, _ = accounts.create()
    entitlements(engine, account, 1, prod_core="restricted")
    entitlements(engine, other, 1, prod_core="full")  # delivered: not shown
    fake_am.refuse(account, 422, {"error": "invalid_product", "message": f"unknown product {MARKUP}"})
    now = datetime.now(UTC) + LATER
    relay(engine, fake_am.url, now=now)
    (row,) = outbox(engine, account)

    state = client.get(f"/support/accounts/{account}/state", headers=SUPPORT).json["outbox"]
    assert (state["undelivered"], state["blocked"]) == (1, 1)
    (shown,) = state["rows"]
    assert shown == {
        "id": row["id"], "event_type": "EntitlementsChanged", "dunning_version": 1, "state": "blocked",
        "attempts": 1, "last_status": 422, "last_error": f"HTTP 422: invalid_product: unknown product {MARKUP}",
        "created_at": row["created_at"].isoformat(), "next_attempt_at": row["next_attempt_at"].isoformat(),
        "blocked_since": now.isoformat()}
    other_state = client.get(f"/support/accounts/{other}/state", headers=SUPPORT).json["outbox"]
    assert other_state == {"undelivered": 0, "blocked": 0, "rows": []}

    page = client.get(f"/support/accounts/{account}", headers=SUPPORT)
    text = page.get_data(as_text=True)
    assert page.status_code == 200
    assert 'id="outbox"' in text and "blocked" in text and "EntitlementsChanged" in text
    assert MARKUP not in text and str(escape(f"unknown product {MARKUP}")) in text
    assert "nothing waiting" in client.get(f"/support/accounts/{other}", headers=SUPPORT).get_data(as_text=True)


def test_a_cancellation_held_for_a_payment_in_flight_and_the_row_behind_it_are_shown(client, accounts, engine,
                                                                                      fake_am):
    account, _ = accounts.create()
    cancellation_in_bad_debt(engine, account)
    entitlements(engine, account, 2, prod_core="revoked")
    payment = pay_bad_debt(engine, account)
    assert relay(engine, fake_am.url).held == 1  # the real relay holds it (the page reads what it wrote)

    state = client.get(f"/support/accounts/{account}/state", headers=SUPPORT).json["outbox"]
    cancel, behind = state["rows"]
    assert (state["undelivered"], state["blocked"]) == (2, 0)
    assert (cancel["event_type"], cancel["state"], cancel["attempts"]) == ("CancellationRequested", "held", 0)
    assert f"bad-debt payment {payment} is in flight" in cancel["last_error"]
    assert (behind["event_type"], behind["state"], behind["attempts"]) == ("EntitlementsChanged", "waiting", 0)

    text = client.get(f"/support/accounts/{account}", headers=SUPPORT).get_data(as_text=True)
    assert "CancellationRequested" in text and "held" in text and f"bad-debt payment {payment} is in flight" in text


def test_the_accounts_undelivered_rows_are_read_from_the_partial_index(engine):
    """Delivered rows are kept for the retention period: the page must not read the account's history."""
    from app.support.queries import OUTBOX_COUNT_SQL, OUTBOX_SQL

    for sql in (OUTBOX_SQL, OUTBOX_COUNT_SQL):
        plan = plan_over_delivered_history(engine, "acct_supp_", 50, sql, {"account": "acct_supp_1"})
        assert "using ix_outbox_pending on" in plan and "Seq Scan" not in plan, plan
