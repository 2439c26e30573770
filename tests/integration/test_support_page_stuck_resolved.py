"""A stuck row once resolved has no next re-drive: beat re-drives only retrying rows, and the support
page's Stuck work table (and its JSON) must not show a resolved row as due to be re-driven."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from sqlalchemy import Engine

from app.recompute.service import run_recompute
from tasks.failures import resolve_stuck
from tests.conftest import SUPPORT_TOKEN, Accounts

SUPPORT = {"Authorization": f"Bearer {SUPPORT_TOKEN}"}


def retrying_row(engine: Engine, account: str, task: str) -> None:
    """A give-up that keeps retrying, as tasks.failures.record_stuck writes it: re-driven in 5 minutes."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO subs_stuck_events (account_id, task_name, task_args, error_class, error, attempts, state, "
            "next_redrive_at) VALUES (%(a)s, %(t)s, jsonb_build_object('account_id', %(a)s), 'database_unavailable', "
            "'OperationalError: the database did not answer', 6, 'retrying', now() + interval '5 minutes')",
            {"a": account, "t": task})


def stuck_cells(client, account: str) -> list[list[str]]:
    html = client.get(f"/support/accounts/{account}", headers=SUPPORT).get_data(as_text=True)
    table = html.split('<table id="stuck">', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.DOTALL)[1:]
    return [[c.strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.DOTALL)] for row in rows]


def test_a_retrying_recompute_resolved_by_a_later_success_shows_no_next_redrive(client, engine: Engine, runtime,
                                                                                accounts: Accounts):
    account, _ = accounts.create()
    retrying_row(engine, account, "tasks.recompute_account")
    [before] = stuck_cells(client, account)
    assert before[1] == "retrying" and before[6] != "-"

    run_recompute(engine, runtime.policy, account, "MANUAL", datetime.now(UTC))  # resolves the account's row

    [after] = stuck_cells(client, account)
    assert after[1] == "resolved"
    assert after[6] == "-"  # the page said it would be re-driven at the time set before
    [row] = client.get(f"/support/accounts/{account}/state", headers=SUPPORT).json["stuck"]
    assert row["state"] == "resolved" and row["next_redrive_at"] is None


def test_a_retrying_task_resolved_by_its_own_success_shows_no_next_redrive(client, engine: Engine,
                                                                           accounts: Accounts):
    account, _ = accounts.create()
    retrying_row(engine, account, "tasks.settle_bad_debt_payment")

    resolve_stuck(engine, "tasks.settle_bad_debt_payment", account)

    [after] = stuck_cells(client, account)
    assert after[1] == "resolved" and after[6] == "-"


def test_a_row_resolved_before_this_release_with_a_next_redrive_left_shows_none(client, engine: Engine,
                                                                               accounts: Accounts):
    # Rows resolved by the writers above before they cleared it keep the time: the page shows it only
    # for a row still retrying, the one state beat re-drives.
    account, _ = accounts.create()
    retrying_row(engine, account, "tasks.settle_bad_debt_payment")
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE subs_stuck_events SET state = 'resolved', resolved_at = now() "
                             "WHERE account_id = %(a)s", {"a": account})
    [after] = stuck_cells(client, account)
    assert after[1] == "resolved" and after[6] == "-"
