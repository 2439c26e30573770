"""The support views show accounts stuck in lifting longer than the guard window."""

from __future__ import annotations

import html
import re
from datetime import UTC, datetime, timedelta

from tests.conftest import SUPPORT_TOKEN, Accounts
from tests.stripe_events import unique

SUPPORT = {"Authorization": f"Bearer {SUPPORT_TOKEN}"}


def lifting_since(engine, account: str, minutes_ago: int) -> None:
    since = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO subs_dunning (account_id, status, level, changed_at) "
                             "VALUES (%(a)s, 'lifting', 'suspended', %(t)s)", {"a": account, "t": since})
        conn.exec_driver_sql("INSERT INTO bad_debt_payment (account_id, idempotency_key, request_fingerprint, amount, "
                             "created_at) VALUES (%(a)s, %(k)s, 'x', 5000, %(t)s)",
                             {"a": account, "k": f"key-{account}", "t": since})


def test_stuck_lifting_is_shown_on_the_account_page_and_listed(client, accounts: Accounts, engine):
    stuck, _ = accounts.create()
    fresh, _ = accounts.create()
    lifting_since(engine, stuck, 45)
    lifting_since(engine, fresh, 10)

    page = client.get(f"/support/accounts/{stuck}", headers=SUPPORT).get_data(as_text=True)
    assert "longer than the 30-minute" in page and 'id="lifting" class="stuck"' in page
    page = client.get(f"/support/accounts/{fresh}", headers=SUPPORT).get_data(as_text=True)
    assert 'id="lifting"' in page and "longer than the" not in page

    state = client.get(f"/support/accounts/{stuck}/state", headers=SUPPORT).json
    assert state["lifting"]["stuck"] is True and state["lifting"]["minutes"] >= 45

    listing = client.get("/support/lifting", headers=SUPPORT)
    assert listing.status_code == 200
    text = listing.get_data(as_text=True)
    assert f"/support/account?id={stuck}" in text and f"/support/account?id={fresh}" not in text
    assert client.get("/support/lifting").status_code == 401


def test_the_listing_links_each_account_by_its_url_encoded_id(client, accounts: Accounts, engine):
    # The id went into the href raw: '#' and '?' cut it short, '%' made it another id.
    account, _ = accounts.create(account_id=unique("acct") + "#1?x%2F \u00e9")
    lifting_since(engine, account, 45)
    text = client.get("/support/lifting", headers=SUPPORT).get_data(as_text=True)
    [href] = re.findall(r'href="(/support/account\?id=[^"]*)"', text)
    assert href.endswith("%231%3Fx%252F%20%C3%A9")
    page = client.get(html.unescape(href), headers=SUPPORT)
    assert page.status_code == 200 and f"Account <code>{html.escape(account)}</code>" in page.get_data(as_text=True)


def test_more_accounts_stuck_than_the_listing_shows_are_counted(client, accounts: Accounts, engine):
    # In an incident (payment outcomes lost) the listing showed its oldest 200 and nothing said there
    # were more: support read 200 stuck accounts where there were 203.
    from app.support.views import LIFTING_LISTED

    for _ in range(LIFTING_LISTED + 3):
        account, _ = accounts.create()
        lifting_since(engine, account, 45)
    text = client.get("/support/lifting", headers=SUPPORT).get_data(as_text=True)
    assert len(re.findall(r'href="/support/account\?id=', text)) == LIFTING_LISTED
    caption = re.search(r'<table id="stuck-lifting">\s*<caption[^>]*>(.*?)</caption>', text, re.DOTALL)
    assert caption is not None and caption.group(1) == f"the oldest {LIFTING_LISTED} of {LIFTING_LISTED + 3} shown"


def test_a_listing_shown_whole_says_nothing_more(client, accounts: Accounts, engine):
    account, _ = accounts.create()
    lifting_since(engine, account, 45)
    text = client.get("/support/lifting", headers=SUPPORT).get_data(as_text=True)
    assert f"/support/account?id={account}" in text and "<caption" not in text
