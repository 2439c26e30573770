"""The support page of an account no recompute has stored a decision for (never recomputed, or every
recompute of it failed): its status, level and amount owed are the defaults of the read views, which
the page must not present as a decision on the unpaid invoices it lists below them."""

from __future__ import annotations

import re

from sqlalchemy import Engine

from tests.conftest import SUPPORT_TOKEN, Accounts
from tests.integration.test_outstanding_by_currency import recomputed
from tests.integration.test_support import failed_invoice_mirrored

SUPPORT = {"Authorization": f"Bearer {SUPPORT_TOKEN}"}


def dd(html: str, dd_id: str) -> str | None:
    found = re.search(rf'<dd id="{dd_id}"[^>]*>(.*?)</dd>', html, re.DOTALL)
    return re.sub(r"<[^>]+>|\s+", " ", found.group(1)).strip() if found else None


def test_a_never_recomputed_account_owing_money_is_not_shown_as_owing_nothing(client, engine: Engine, runtime,
                                                                              accounts: Accounts):
    account, customer = accounts.create()
    failed_invoice_mirrored(engine, customer)  # a failed invoice of 5000 that no recompute has seen yet

    html = client.get(f"/support/accounts/{account}", headers=SUPPORT).get_data(as_text=True)
    assert "Past due" in html  # the invoice below
    assert dd(html, "outstanding") == "not computed yet"  # it said "nothing"
    assert "none stored yet" in (dd(html, "no-decision") or "")
    # The JSON keeps the contract's defaults (DESIGN 11); version 0 says no decision is stored.
    state = client.get(f"/support/accounts/{account}/state", headers=SUPPORT).json
    assert state["dunning"]["version"] == 0 and state["dunning"]["outstanding_amount"] == 0

    recomputed(engine, runtime, account)
    html = client.get(f"/support/accounts/{account}", headers=SUPPORT).get_data(as_text=True)
    assert dd(html, "outstanding") == "50.00 USD"
    assert dd(html, "no-decision") is None
