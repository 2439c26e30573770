"""The support page in a browser: what it shows is escaped, and the responses tell the browser not to
frame, sniff, cache or run anything but the page's own script."""

from __future__ import annotations

import pytest
from markupsafe import escape

from tests.conftest import SUPPORT_TOKEN

SUPPORT = {"Authorization": f"Bearer {SUPPORT_TOKEN}"}
MARKUP = '<img src=x onerror="alert(1)">'


def test_markup_in_an_account_id_a_decline_message_or_a_task_error_is_shown_as_text(client, engine, accounts):
    """Account ids come from other teams, failure reasons and errors from Stripe: none is trusted."""
    account, _ = accounts.create(account_id=f"acct_{MARKUP}")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO bad_debt_payment (account_id, idempotency_key, request_fingerprint, amount, failure_reason) "
            "VALUES (%(a)s, 'k-xss', 'f', 100, %(m)s)", {"a": account, "m": f"card_declined: {MARKUP}"})
        conn.exec_driver_sql("INSERT INTO subs_stuck_events (account_id, task_name, error_class, error) "
                             "VALUES (%(a)s, 'tasks.recompute_account', 'permanent', %(m)s)",
                             {"a": account, "m": f"CardError: {MARKUP}"})
    page = client.get(f"/support/accounts/{account}", headers=SUPPORT)
    text = page.get_data(as_text=True)
    assert page.status_code == 200
    assert MARKUP not in text
    assert text.count(str(escape(MARKUP))) >= 3  # the id (title, heading, data attribute), the reason, the error


@pytest.mark.parametrize("path", ["/support/accounts/{account}", "/support/lifting", "/support/login",
                                  "/support/accounts/{account}/state"])
def test_support_responses_may_not_be_framed_cached_or_sniffed(client, accounts, path):
    """A page that authenticates writes by its cookie is kept out of other sites' frames (clickjacking
    the Recompute button), out of caches (it holds account data and the session's CSRF token) and runs
    only its own script (a markup slip is not an XSS)."""
    account, _ = accounts.create()
    response = client.get(path.format(account=account), headers=SUPPORT)
    assert response.status_code == 200
    assert response.headers["X-Frame-Options"] == "DENY"
    policy = response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy and "unsafe-inline'" not in \
        policy.split("script-src", 1)[1].split(";", 1)[0]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "no-store" in response.headers["Cache-Control"]
    assert response.headers["Referrer-Policy"] == "same-origin"
