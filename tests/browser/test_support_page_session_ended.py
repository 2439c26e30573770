"""The support page after its session ended (signed out in another tab, or its 12 hours over): the
Recompute button says to sign in again and links to the sign-in form that comes back to this page,
not the API's "a valid bearer token for support is required", which a support person never uses."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import SUPPORT_TOKEN, Accounts

pytestmark = [pytest.mark.browser]


def test_recompute_after_the_session_ended_asks_to_sign_in_again(browser: Any, live_server: str,
                                                                  accounts: Accounts) -> None:
    account, _ = accounts.create()
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(f"{live_server}/support/accounts/{account}")
        page.fill("#token", SUPPORT_TOKEN)
        page.click("#sign-in")
        page.wait_for_selector("#recompute")

        other = context.new_page()  # another tab of the same browser signs out
        other.goto(f"{live_server}/support/accounts/{account}")
        other.click("text=Sign out")
        other.wait_for_selector("#token")
        other.close()

        page.click("#recompute")
        page.wait_for_selector("#task-state.error")
        shown = page.text_content("#task-state") or ""
        assert "sign in again" in shown
        assert "bearer" not in shown
        link = page.get_attribute("#task-state a", "href")
        assert link is not None and link.startswith("/support/login?next=")
        assert page.is_enabled("#recompute")

        page.click("#task-state a")
        page.wait_for_selector("#token")
        page.fill("#token", SUPPORT_TOKEN)
        page.click("#sign-in")
        page.wait_for_selector("#recompute")
        # Back to this account's page, at the address the page's own links use (the query form).
        assert page.url == f"{live_server}/support/account?id={account}"
        assert page.text_content("h1") == f"Account {account}"
    finally:
        context.close()


def test_recompute_from_a_page_opened_before_signing_in_again_says_to_reload_it(
        browser: Any, live_server: str, engine: Any, accounts: Accounts) -> None:
    # Signed in again in another tab, the browser holds a new session whose CSRF token this page does
    # not have: the button said "not queued: a cookie session must send its X-Support-CSRF header on
    # writes", which names nothing a support person did or can do.
    account, _ = accounts.create()
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(f"{live_server}/support/accounts/{account}")
        page.fill("#token", SUPPORT_TOKEN)
        page.click("#sign-in")
        page.wait_for_selector("#recompute")

        other = context.new_page()  # another tab signs out and in again: a new session
        other.goto(f"{live_server}/support/accounts/{account}")
        other.click("text=Sign out")
        other.wait_for_selector("#token")
        other.fill("#token", SUPPORT_TOKEN)
        other.click("#sign-in")
        other.wait_for_load_state()
        other.goto(f"{live_server}/support/accounts/{account}")
        other.wait_for_selector("#recompute")  # signed in again
        other.close()

        page.click("#recompute")
        page.wait_for_selector("#task-state.error")
        assert page.text_content("#task-state") == (
            "not queued: this page was opened before you signed in again; reload it, then press Recompute again")
        assert page.is_enabled("#recompute")

        page.reload()
        page.click("#recompute")
        page.wait_for_selector("#task-state:has-text('task')")  # queued this time (no worker runs it here)
    finally:
        context.close()
    with engine.connect() as conn:
        actions = conn.exec_driver_sql("SELECT action FROM audit_log WHERE action = 'recompute'").scalars().all()
    assert actions == ["recompute"]  # the stale page's press queued nothing
