"""The support page in a real headless Chromium: sign in, press Recompute, see the new state."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine

from tests.conftest import SUPPORT_ACTOR, SUPPORT_TOKEN, Accounts
from tests.stripe_events import unique

pytestmark = [pytest.mark.browser, pytest.mark.worker]


def failed_invoice_in_mirror_only(engine: Engine, customer: str) -> str:
    """A failed invoice the mirror knows of but no recompute has seen: the stored state is stale."""
    invoice = unique("in")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO stripe_invoice (id, stripe_customer_id, status, amount_due, amount_remaining, created, "
            "first_failed_at, last_failed_at, source_created, source_rank, source_event_id) "
            "VALUES (%(i)s, %(c)s, 'open', 5000, 5000, now() - interval '2 days', now() - interval '1 day', "
            "now() - interval '1 day', 1, 1, 'evt_browser')", {"i": invoice, "c": customer})
    return invoice


def test_recompute_button_shows_the_new_state(browser: Any, live_server: str, engine: Engine, accounts: Accounts,
                                              worker: Any) -> None:
    account, customer = accounts.create()
    invoice = failed_invoice_in_mirror_only(engine, customer)
    context = browser.new_context()
    page = context.new_page()
    try:
        response = page.goto(f"{live_server}/support/accounts/{account}")
        assert response is not None and response.status == 401  # the sign-in form
        page.fill("#token", SUPPORT_TOKEN)
        page.click("#sign-in")
        page.wait_for_selector("#recompute")
        assert page.url.endswith(f"/support/accounts/{account}")
        assert page.text_content("#status") == "current"
        assert page.text_content("#version") == "0"
        assert invoice in page.text_content("#invoices")
        assert "Past due" in page.text_content("#invoices")  # the billing-history label

        page.click("#recompute")
        page.wait_for_selector("#task-state.done", timeout=30000)  # CSP: no wait_for_function (it evals)

        assert page.text_content("#status") == "past_due"
        assert page.text_content("#level") == "notice"
        assert page.text_content("#version") == "1"
        assert page.text_content("#last-trigger") == "NINJAPANEL_BUTTON"
        assert "level.notice" in page.text_content("#reasons")
        assert "recomputed: changed" in page.text_content("#task-state")
        assert page.is_enabled("#recompute")
    finally:
        context.close()
    with engine.connect() as conn:
        actions = conn.exec_driver_sql("SELECT actor, action FROM audit_log ORDER BY id").all()
        status = conn.exec_driver_sql("SELECT status FROM subs_dunning WHERE account_id = %(a)s",
                                      {"a": account}).scalar_one()
    assert [tuple(a) for a in actions] == [(SUPPORT_ACTOR, "sign_in"), (SUPPORT_ACTOR, "recompute")]
    assert status == "past_due"
