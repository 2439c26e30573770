"""A token pasted into the sign-in form with blanks around it (a copied line's newline, a space before
it) signs in, as the same token does in an Authorization header (app/auth.py drops the blanks around
a bearer token). A configured token holds no whitespace at all (SUPPORT_TOKENS: an entry holding a
space or a line break stops start-up), so nothing else can match; blanks inside still do not."""

from __future__ import annotations

import pytest

from tests.conftest import SUPPORT_TOKEN, Accounts


@pytest.mark.parametrize("pasted", [f" {SUPPORT_TOKEN}", f"{SUPPORT_TOKEN}\n", f"\t{SUPPORT_TOKEN} \r\n",
                                    f"\u00a0{SUPPORT_TOKEN}\u2003"], ids=["space", "newline", "tabs", "unicode"])
def test_blanks_around_a_pasted_token_are_dropped_as_for_the_bearer_header(flask_app, client, accounts: Accounts,
                                                                           pasted: str) -> None:
    account, _ = accounts.create()
    page = f"/support/accounts/{account}"
    # The bearer header: the same text around the token opens the page.
    assert client.get(page, headers={"Authorization": f"Bearer {pasted}".rstrip("\r\n")}).status_code == 200
    browser = flask_app.test_client()
    signed_in = browser.post("/support/login", data={"token": pasted, "next": page})
    assert signed_in.status_code == 303, signed_in.get_data(as_text=True)
    assert browser.get(page).status_code == 200


@pytest.mark.parametrize("near", [f"{SUPPORT_TOKEN[:8]} {SUPPORT_TOKEN[8:]}", " ", ""])
def test_blanks_inside_or_only_blanks_are_no_token(flask_app, accounts: Accounts, near: str) -> None:
    account, _ = accounts.create()
    browser = flask_app.test_client()
    refused = browser.post("/support/login", data={"token": near, "next": f"/support/accounts/{account}"})
    assert refused.status_code == 401 and "not valid" in refused.get_data(as_text=True)
