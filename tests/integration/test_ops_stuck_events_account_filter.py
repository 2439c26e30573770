"""GET /ops/stuck-events?account_id=<id> lists the stuck work of that account, whatever the id: ""
is an account id like any other (README "Account ids in URLs": the support page's ?id= is the account
""), so ?account_id= lists the work of the account "", not every account's. Without the parameter,
every account's is listed; named twice it is a 400, as the support page's ?id= is."""

from __future__ import annotations

from sqlalchemy import Engine

from tests.conftest import Accounts, service_headers


def stuck(engine: Engine, *rows: tuple[str | None, str]) -> None:
    with engine.begin() as conn:
        for account, error in rows:
            conn.exec_driver_sql("INSERT INTO subs_stuck_events (account_id, task_name, error_class, error, state) "
                                 "VALUES (%(a)s, 't', 'x', %(e)s, 'dead')", {"a": account, "e": error})


def listed(client, query: str) -> list[tuple[str | None, str]]:
    response = client.get(f"/ops/stuck-events{query}", headers=service_headers())
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    return sorted(((item["account_id"], item["error"]) for item in response.json["stuck_events"]),
                  key=lambda row: (row[0] or "", row[1]))


def test_an_empty_account_id_lists_the_work_of_the_account_named_empty(client, engine: Engine,
                                                                       accounts: Accounts) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO subs_account (account_id) VALUES ('')")
    other, _ = accounts.create()
    stuck(engine, ("", "of the empty id"), (other, "of another account"), (None, "of no account"))
    assert listed(client, "?account_id=") == [("", "of the empty id")]
    assert listed(client, "?account_id=&state=dead") == [("", "of the empty id")]
    assert listed(client, f"?account_id={other}") == [(other, "of another account")]
    assert listed(client, "") == [(None, "of no account"), ("", "of the empty id"), (other, "of another account")]


def test_an_account_id_named_twice_is_a_400(client, engine: Engine, accounts: Accounts) -> None:
    first, _ = accounts.create()
    second, _ = accounts.create()
    stuck(engine, (first, "a"), (second, "b"))
    response = client.get(f"/ops/stuck-events?account_id={first}&account_id={second}", headers=service_headers())
    assert response.status_code == 400 and "account_id" in response.json["reason"]
