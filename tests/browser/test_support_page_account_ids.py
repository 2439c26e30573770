"""The support page of an account whose id needs escaping, in a real headless Chromium: the page's
script POSTs the recompute, polls and refreshes at the page's own URL, for this account."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine

from app.account_urls import segment
from tests.browser.test_support_page import failed_invoice_in_mirror_only
from tests.conftest import SUPPORT_TOKEN, Accounts
from tests.stripe_events import unique

pytestmark = [pytest.mark.browser, pytest.mark.worker]


def test_recompute_button_of_an_account_whose_id_holds_slashes_and_reserved_characters(
        browser: Any, live_server: str, engine: Engine, accounts: Accounts, worker: Any) -> None:
    # Its '/' arrives decoded at the server ("x/state" also ends like the state route), '?' and '#'
    # would end the path, '%' and '+' would be read as escapes.
    base = unique("acct")
    other, _ = accounts.create(account_id=base)  # what a '/' cut short would name
    account, customer = accounts.create(account_id=f"{base}/1?x=#y%2F \u00e9+/state")
    failed_invoice_in_mirror_only(engine, customer)
    context = browser.new_context()
    page = context.new_page()
    try:
        url = f"{live_server}/support/accounts/{segment(account)}"
        response = page.goto(url)
        assert response is not None and response.status == 401  # the sign-in form
        page.fill("#token", SUPPORT_TOKEN)
        page.click("#sign-in")
        page.wait_for_selector("#recompute")
        assert page.url == url
        assert page.text_content("h1") == f"Account {account}"
        assert page.text_content("#status") == "current"

        page.click("#recompute")
        page.wait_for_selector("#task-state.done", timeout=30000)
        assert page.text_content("#status") == "past_due"
        assert page.text_content("#version") == "1"
        assert "recomputed: changed" in page.text_content("#task-state")
    finally:
        context.close()
    with engine.connect() as conn:
        recomputed = conn.exec_driver_sql("SELECT account_id FROM audit_log WHERE action = 'recompute'").scalars().all()
        versions: dict[str, int] = dict(conn.exec_driver_sql("SELECT account_id, version FROM subs_dunning").all())
    assert recomputed == [account]
    assert versions.get(account) == 1 and other not in versions
