"""Login CSRF: another site's page must not sign a browser in (as the attacker's actor, whose name the
victim's Recompute clicks would then be audited under). POST /support/login refuses a form sent from
another origin, by the browser's Fetch Metadata (Sec-Fetch-Site) or, from a browser too old to send it,
its Origin; a client sending neither (curl, a script) is no browser posting another site's form."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine

from tests.conftest import SUPPORT_ACTOR, SUPPORT_TOKEN, Accounts


def audit_actions(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return [(r.actor, r.action) for r in conn.exec_driver_sql("SELECT actor, action FROM audit_log ORDER BY id")]


CROSS_ORIGIN = {
    "another site (Fetch Metadata)": {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
    "a sibling site, another origin": {"Sec-Fetch-Site": "same-site", "Origin": "https://other.localhost"},
    "another site, no Fetch Metadata": {"Origin": "https://evil.example"},
    "another port of this host, no Fetch Metadata": {"Origin": "http://localhost:8081"},
    "an opaque origin (sandboxed frame, data: URL)": {"Origin": "null"},
}


@pytest.mark.parametrize("headers", CROSS_ORIGIN.values(), ids=CROSS_ORIGIN.keys())
def test_a_sign_in_form_sent_from_another_origin_signs_nothing_in(flask_app, engine, accounts: Accounts,
                                                                  headers: dict[str, str]) -> None:
    browser = flask_app.test_client()
    account, _ = accounts.create()
    page = f"/support/accounts/{account}"
    refused = browser.post("/support/login", headers=headers, data={"token": SUPPORT_TOKEN, "next": page})
    assert refused.status_code == 403
    assert "another site" in refused.get_data(as_text=True) and 'name="token"' in refused.get_data(as_text=True)
    assert browser.get_cookie("session") is None
    assert browser.get(page).status_code == 401
    assert audit_actions(engine) == []


def test_a_cross_origin_sign_in_leaves_the_browser_s_own_session_as_it_was(flask_app, engine,
                                                                           accounts: Accounts) -> None:
    browser = flask_app.test_client()
    account, _ = accounts.create()
    page = f"/support/accounts/{account}"
    assert browser.post("/support/login", data={"token": SUPPORT_TOKEN, "next": page}).status_code == 303
    held = browser.get_cookie("session")
    assert held is not None
    assert browser.post("/support/login", headers=CROSS_ORIGIN["another site (Fetch Metadata)"],
                        data={"token": SUPPORT_TOKEN, "next": page}).status_code == 403
    after = browser.get_cookie("session")
    assert after is not None and after.value == held.value  # not replaced, not ended
    assert browser.get(page).status_code == 200
    assert audit_actions(engine) == [(SUPPORT_ACTOR, "sign_in")]


SAME_ORIGIN: dict[str, dict[str, Any]] = {
    "this page's form (Fetch Metadata)": {"headers": {"Sec-Fetch-Site": "same-origin",
                                                      "Origin": "http://localhost"}},
    "typed or bookmarked (Fetch Metadata)": {"headers": {"Sec-Fetch-Site": "none"}},
    "this page's form, no Fetch Metadata": {"headers": {"Origin": "http://localhost"}},
    "over https on a named host": {"headers": {"Origin": "https://support.example"},
                                   "base_url": "https://support.example"},
    "behind a TLS proxy (the Origin's scheme is not the request's)": {
        "headers": {"Origin": "https://support.example"}, "base_url": "http://support.example"},
    "a client that is no browser (curl)": {"headers": {}},
}


@pytest.mark.parametrize("sent", SAME_ORIGIN.values(), ids=SAME_ORIGIN.keys())
def test_a_sign_in_from_the_support_site_itself_signs_in(flask_app, engine, accounts: Accounts,
                                                         sent: dict[str, Any]) -> None:
    browser = flask_app.test_client()
    account, _ = accounts.create()
    page = f"/support/accounts/{account}"
    signed_in = browser.post("/support/login", data={"token": SUPPORT_TOKEN, "next": page}, **sent)
    assert signed_in.status_code == 303, signed_in.get_data(as_text=True)
    assert audit_actions(engine) == [(SUPPORT_ACTOR, "sign_in")]
