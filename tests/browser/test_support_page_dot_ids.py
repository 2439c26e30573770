"""The support page of the accounts "." and ".." in a real headless Chromium. A browser resolves dot
segments before it sends a request, escaped ones (%2E) too: /support/accounts/%2E%2E goes out as
/support/. The query form (/support/account?id=..) reaches them, and the page's own links, its
Recompute POST and its refresh use it, for every account."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import Engine

from tests.browser.test_support_page import failed_invoice_in_mirror_only
from tests.conftest import SUPPORT_TOKEN, Accounts
from tests.integration.test_support_lifting import lifting_since

pytestmark = [pytest.mark.browser, pytest.mark.worker]


def sign_in(page: Any) -> None:
    page.fill("#token", SUPPORT_TOKEN)
    page.click("#sign-in")
    page.wait_for_selector("h1")


@pytest.mark.parametrize("account", [".", ".."])
def test_recompute_button_of_an_account_named_dots(browser: Any, live_server: str, engine: Engine,
                                                  accounts: Accounts, worker: Any, account: str) -> None:
    _, customer = accounts.create(account_id=account)
    accounts.create(account_id="x")  # what the page of "." or ".." must not turn into
    failed_invoice_in_mirror_only(engine, customer)
    context = browser.new_context()
    page = context.new_page()
    try:
        url = f"{live_server}/support/account?id={quote(account, safe='')}"
        response = page.goto(url)
        assert response is not None and response.status == 401  # the sign-in form, which comes back here
        sign_in(page)
        assert page.url == url
        assert page.text_content("h1") == f"Account {account}"
        assert page.text_content("#status") == "current"

        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.click("#recompute")
        page.wait_for_selector("#task-state.done, #task-state.error", timeout=30000)
        assert "recomputed: changed" in page.text_content("#task-state")
        assert page.text_content("#status") == "past_due"
        assert page.text_content("h1") == f"Account {account}"
        # The POST and the refresh went to this account's address, as the browser sent them.
        ours = [u for u in requests if "/support/account" in u]
        assert f"{live_server}/support/account/recompute?id={quote(account, safe='')}" in ours
        assert url in ours
    finally:
        context.close()
    with engine.connect() as conn:
        recomputed = conn.exec_driver_sql("SELECT account_id FROM audit_log WHERE action = 'recompute'").scalars().all()
        versions: dict[str, int] = dict(conn.exec_driver_sql("SELECT account_id, version FROM subs_dunning").all())
    assert recomputed == [account]
    assert versions == {account: 1}


def test_the_lifting_listing_opens_the_pages_of_accounts_named_dots(browser: Any, live_server: str, engine: Engine,
                                                                   accounts: Accounts) -> None:
    for account in (".", "..", "x/.."):
        accounts.create(account_id=account)
        lifting_since(engine, account, 45)
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(f"{live_server}/support/lifting")
        sign_in(page)
        for account in (".", "..", "x/.."):
            page.get_by_role("link", name=account, exact=True).click()
            page.wait_for_selector("h1")
            assert page.text_content("h1") == f"Account {account}"
            assert page.text_content("#status") == "lifting"
            page.go_back()
            page.wait_for_selector("#stuck-lifting")
    finally:
        context.close()
