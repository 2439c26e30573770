"""The support page's lists of an account's work are bounded (the newest rows first): when an
account has more than a list shows, the page and its JSON say how many there are, not only the
rows shown, so support never counts 20 failures where there are 45."""

from __future__ import annotations

import re

from sqlalchemy import Engine

from tests.conftest import SUPPORT_TOKEN, Accounts

SUPPORT = {"Authorization": f"Bearer {SUPPORT_TOKEN}"}


def stuck_rows(engine: Engine, account: str, state: str, n: int, task: str = "tasks.recompute_account") -> None:
    with engine.begin() as conn:
        for i in range(n):
            conn.exec_driver_sql(
                "INSERT INTO subs_stuck_events (account_id, task_name, task_args, error_class, error, state) "
                "VALUES (%(a)s, %(t)s, jsonb_build_object('n', %(i)s::int), 'unexpected', %(e)s, %(s)s)",
                {"a": account, "t": task, "i": i, "e": f"failure {state} {i}", "s": state})


def caption(html: str, table: str) -> str | None:
    found = re.search(rf'<table id="{table}">\s*<caption[^>]*>(.*?)</caption>', html, re.DOTALL)
    return re.sub(r"\s+", " ", found.group(1)).strip() if found else None


def test_more_stuck_work_than_the_page_lists_is_counted_on_the_page_and_in_its_json(client, engine: Engine,
                                                                                    accounts: Accounts):
    account, _ = accounts.create()
    stuck_rows(engine, account, "dead", 25, task="tasks.settle_bad_debt_payment")
    stuck_rows(engine, account, "resolved", 3, task="tasks.settle_bad_debt_payment")

    page = client.get(f"/support/accounts/{account}", headers=SUPPORT)
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    stuck_table = html.split('<table id="stuck">', 1)[1].split("</table>", 1)[0]
    assert stuck_table.count("<tr>") == 1 + 20  # the header and the rows shown
    assert caption(html, "stuck") == "the first 20 of 28 shown (25 not resolved): unresolved first, newest first"

    state = client.get(f"/support/accounts/{account}/state", headers=SUPPORT).json
    assert len(state["stuck"]) == 20
    assert state["totals"] == {"retries": 0, "stuck": 28, "stuck_unresolved": 25, "episodes": 0,
                               "bad_debt_payments": 0}


def test_a_list_the_page_shows_whole_says_nothing_more(client, engine: Engine, accounts: Accounts):
    account, _ = accounts.create()
    stuck_rows(engine, account, "dead", 2, task="tasks.settle_bad_debt_payment")
    html = client.get(f"/support/accounts/{account}", headers=SUPPORT).get_data(as_text=True)
    for table in ("stuck", "retries", "episodes", "bad-debt-payments"):
        assert caption(html, table) is None
    state = client.get(f"/support/accounts/{account}/state", headers=SUPPORT).json
    assert state["totals"]["stuck"] == 2 and state["totals"]["stuck_unresolved"] == 2


def test_more_bad_debt_payments_than_the_page_lists_are_counted(client, engine: Engine, accounts: Accounts):
    account, _ = accounts.create()
    with engine.begin() as conn:
        for i in range(12):
            conn.exec_driver_sql(
                "INSERT INTO bad_debt_payment (account_id, idempotency_key, request_fingerprint, amount, currency, "
                "state, failure_reason) VALUES (%(a)s, %(k)s, 'f', 5000, 'usd', 'failed', 'declined: do_not_honor')",
                {"a": account, "k": f"k-{i}"})
    html = client.get(f"/support/accounts/{account}", headers=SUPPORT).get_data(as_text=True)
    assert caption(html, "bad-debt-payments") == "the newest 10 of 12 shown"
    assert client.get(f"/support/accounts/{account}/state", headers=SUPPORT).json["totals"]["bad_debt_payments"] == 12
