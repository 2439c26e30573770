"""Login CSRF in a real Chromium: a page of another site that posts the sign-in form (the attacker's
token, sent by the victim's browser) must not sign the victim's browser in as the attacker."""

from __future__ import annotations

import html
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import SUPPORT_TOKEN, Accounts

pytestmark = [pytest.mark.browser]


@pytest.fixture
def other_site(live_server: str) -> Iterator[str]:
    """Another site (localhost, where the support page is 127.0.0.1) whose page posts the sign-in form
    to the support page by itself, as a page an attacker lures a support person to would."""
    from werkzeug.serving import make_server

    target = html.escape(f"{live_server}/support/login")
    body = (f'<!doctype html><form id="f" method="post" action="{target}">'
            f'<input type="hidden" name="token" value="{html.escape(SUPPORT_TOKEN)}">'
            '<input type="hidden" name="next" value="/support/lifting"></form>'
            '<script>document.getElementById("f").submit()</script>').encode()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/html"), ("Content-Length", str(len(body)))])
        return [body]

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()


def test_another_site_s_sign_in_form_does_not_sign_the_browser_in(browser: Any, live_server: str,
                                                                  other_site: str, accounts: Accounts) -> None:
    account, _ = accounts.create()
    context = browser.new_context()
    page = context.new_page()
    try:
        with page.expect_response(lambda r: r.url.endswith("/support/login")) as posted:
            page.goto(other_site)
        page.goto(f"{live_server}/support/accounts/{account}")
        # The sign-in form: not signed in (the attacker's session cookie was set: the page showed the
        # account, and its Recompute would have been audited under the attacker's actor).
        page.wait_for_selector("#token, #recompute")
        assert page.query_selector("#recompute") is None and page.query_selector("#token") is not None
        assert posted.value.status == 403

        # The support site's own form still signs in, with no script of its own.
        page.fill("#token", SUPPORT_TOKEN)
        page.click("#sign-in")
        page.wait_for_selector("#recompute")
    finally:
        context.close()
