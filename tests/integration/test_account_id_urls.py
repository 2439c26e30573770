"""Account ids of any form reach their account through every route that names one, and every URL the
support pages build leads back to it: other teams create the accounts, and an id may hold '/', '?',
'#', '%', spaces, '+', unicode, be "." or "..", or be long. A client sends the id as one
percent-encoded path segment (app.account_urls.segment: '/' as %2F, "." and ".." as %2E)."""

from __future__ import annotations

import html
import http.client
import json
import os
import re

import pytest

from app.account_urls import query, segment
from tests.conftest import SUPPORT_TOKEN, Accounts, service_headers
from tests.integration.bad_debt_setup import key, pay
from tests.integration.processes import web_process
from tests.integration.test_support import signs_in_back_to
from tests.integration.test_support_lifting import lifting_since

SUPPORT = {"Authorization": f"Bearer {SUPPORT_TOKEN}"}
ODD_IDS = ["acct/1", "/acct", "acct/", "a//b", "acct?x=1", "acct#1", "acct%2F1", "acct%", "acct 1", " acct ", "acct+1",
           "acct\u00e9\u2713", ".", "..", "...", ".acct", "acct.", "acct/..", "../acct", "acct/./x", "x/dunning",
           "x/billing-history", "x/state", "x/recompute", "x" * 2000]


def _id(account: str) -> str:
    return account if len(account) < 20 else f"{len(account)} chars"


def shown(account: str) -> str:
    return f"Account <code>{html.escape(account)}</code>"


@pytest.mark.parametrize("account", ODD_IDS, ids=_id)
def test_the_json_api_answers_for_the_account_named(client, accounts: Accounts, account):
    accounts.create(account_id=account)
    accounts.create(account_id="x")  # "x/dunning" must not be taken for "x"'s dunning, nor the reverse
    dunning = client.get(f"/accounts/{segment(account)}/dunning", headers=service_headers())
    assert dunning.status_code == 200, dunning.get_data(as_text=True)[:300]
    assert dunning.json["account_id"] == account
    history = client.get(f"/accounts/{segment(account)}/billing-history", headers=service_headers())
    assert history.status_code == 200 and history.json["account_id"] == account
    missing = client.get(f"/accounts/{segment(account + '/none')}/dunning", headers=service_headers())
    assert missing.status_code == 404 and missing.json["error"] == "not_found"


@pytest.mark.parametrize("account", ODD_IDS, ids=_id)
def test_the_support_routes_answer_for_the_account_named(client, accounts: Accounts, engine, account):
    accounts.create(account_id=account)
    accounts.create(account_id="x")
    page = client.get(f"/support/accounts/{segment(account)}", headers=SUPPORT)
    assert page.status_code == 200 and shown(account) in page.get_data(as_text=True)
    # The page's script takes its URLs from the page: the server built them for this id, in the query
    # form (which a browser sends as it is, for "." and ".." too).
    [data_page] = re.findall(r'data-page="([^"]*)"', page.get_data(as_text=True))
    assert html.unescape(data_page) == f"/support/account?{query(account)}"
    [data_recompute] = re.findall(r'data-recompute="([^"]*)"', page.get_data(as_text=True))
    assert html.unescape(data_recompute) == f"/support/account/recompute?{query(account)}"
    state = client.get(f"/support/accounts/{segment(account)}/state", headers=SUPPORT)
    assert state.status_code == 200 and state.json["dunning"]["account_id"] == account
    queued = client.post(f"/support/accounts/{segment(account)}/recompute", headers=SUPPORT)
    assert queued.status_code == 202 and queued.json["account_id"] == account
    with engine.connect() as conn:
        audited = conn.exec_driver_sql("SELECT account_id FROM audit_log WHERE action = 'recompute'").scalars().all()
    assert audited == [account]


@pytest.mark.parametrize("account", [*ODD_IDS, ""], ids=_id)
def test_the_query_form_answers_for_the_account_named(client, accounts: Accounts, engine, account):
    """/support/account?id=<id>: the form the page's own links use, which reaches every id ("" too)."""
    with engine.begin() as conn:  # accounts.create takes "" for "make one up"
        conn.exec_driver_sql("INSERT INTO subs_account (account_id) VALUES (%(a)s)", {"a": account})
    accounts.create(account_id="x")
    page = client.get(f"/support/account?{query(account)}", headers=SUPPORT)
    assert page.status_code == 200 and shown(account) in page.get_data(as_text=True)
    [data_page] = re.findall(r'data-page="([^"]*)"', page.get_data(as_text=True))
    assert client.get(html.unescape(data_page), headers=SUPPORT).get_data() == page.get_data()
    # A form decoder's spelling of the id ('+' for a space) names it as well.
    assert client.get("/support/account", query_string={"id": account}, headers=SUPPORT).status_code == 200
    state = client.get(f"/support/account/state?{query(account)}", headers=SUPPORT)
    assert state.status_code == 200 and state.json["dunning"]["account_id"] == account
    [data_recompute] = re.findall(r'data-recompute="([^"]*)"', page.get_data(as_text=True))
    queued = client.post(html.unescape(data_recompute), headers=SUPPORT)
    assert queued.status_code == 202 and queued.json["account_id"] == account
    missing = client.get(f"/support/account/state?{query(account + '/none')}", headers=SUPPORT)
    assert missing.status_code == 404
    with engine.connect() as conn:
        audited = conn.exec_driver_sql("SELECT account_id FROM audit_log WHERE action = 'recompute'").scalars().all()
    assert audited == [account]


@pytest.mark.parametrize("path", ["/support/account", "/support/account/state", "/support/account/recompute"])
@pytest.mark.parametrize("named", ["", "?x=1", "?id=a&id=b"], ids=["no query", "no id", "two ids"])
def test_the_query_form_names_one_account_or_is_a_400(client, accounts: Accounts, path, named):
    accounts.create(account_id="a")
    method = "POST" if path.endswith("recompute") else "GET"
    assert client.open(path + named, method=method).status_code == 401
    response = client.open(path + named, method=method, headers=SUPPORT)
    assert response.status_code == 400 and "?id=" in response.json["reason"]


@pytest.mark.parametrize("account", ["..", ".", "", "acct?x=1#y%2F \u00e9+", "/acct"], ids=_id)
def test_sign_in_comes_back_to_the_query_form_page_of_the_account_named(flask_app, engine, clean, account):
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO subs_account (account_id) VALUES (%(a)s), ('x')", {"a": account})
    signs_in_back_to(flask_app.test_client(), f"/support/account?{query(account)}", account)


def test_the_page_of_an_id_ending_in_a_routes_suffix_is_that_accounts_page(client, accounts: Accounts):
    # "x%2Fstate" is the account "x/state", not the state of "x" (whose '/state' is the route's own).
    accounts.create(account_id="x")
    accounts.create(account_id="x/state")
    page = client.get("/support/accounts/x%2Fstate", headers=SUPPORT)
    assert page.status_code == 200 and shown("x/state") in page.get_data(as_text=True)
    assert client.get("/support/accounts/x/state", headers=SUPPORT).json["dunning"]["account_id"] == "x"
    # A POST to the page of "x/recompute" is no recompute of "x".
    accounts.create(account_id="x/recompute")
    assert client.post("/support/accounts/x%2Frecompute", headers=SUPPORT).status_code == 405
    assert client.get("/support/accounts/x%2Frecompute", headers=SUPPORT).status_code == 200


@pytest.mark.parametrize("account", ["acct/1", "x/state", "acct?x=1#y%2F \u00e9+", "/acct"], ids=_id)
def test_sign_in_comes_back_to_the_page_of_the_account_named(flask_app, accounts: Accounts, account):
    accounts.create(account_id=account)
    accounts.create(account_id="x")
    signs_in_back_to(flask_app.test_client(), f"/support/accounts/{segment(account)}", account)


def test_the_lifting_listing_links_each_account_to_its_own_page(client, accounts: Accounts, engine):
    odd = ["acct/1", "x/state", "..", "/acct", "acct#1?x%2F \u00e9"]
    for account in odd:
        accounts.create(account_id=account)
        lifting_since(engine, account, 45)
    accounts.create(account_id="x")
    text = client.get("/support/lifting", headers=SUPPORT).get_data(as_text=True)
    hrefs = re.findall(r'href="(/support/account\?id=[^"]*)"', text)
    assert len(hrefs) == len(odd)
    for href in hrefs:
        assert href.count("/") == 2 and href.count("?") == 1, href  # the id whole in the query: '/', '?' encoded
    pages = {href: client.get(html.unescape(href), headers=SUPPORT).get_data(as_text=True) for href in hrefs}
    assert sorted(next(a for a in odd if shown(a) in page) for page in pages.values()) == sorted(odd)


@pytest.mark.parametrize("account", ["acct/1", "acct?x=1#y%2F \u00e9+", "..", "x" * 2000], ids=_id)
def test_pay_bad_debt_and_ops_stuck_events_take_the_account_named(client, accounts: Accounts, engine, account):
    accounts.create(account_id=account)
    accounts.create(account_id="acct")
    refused = pay(client, {"account_id": account, "amount": 1000}, key())
    assert refused.status_code == 409 and refused.json["error"] == "not_in_bad_debt"
    unknown = pay(client, {"account_id": account + "/none", "amount": 1000}, key())
    assert unknown.status_code == 404
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO subs_stuck_events (account_id, task_name, error_class, error, state) "
                             "VALUES (%(a)s, 't', 'x', 'e', 'dead'), ('acct', 't', 'x', 'e', 'dead')", {"a": account})
    listed = client.get("/ops/stuck-events", query_string={"state": "dead", "account_id": account},
                        headers=service_headers())
    assert listed.status_code == 200, listed.get_data(as_text=True)[:300]
    assert [item["account_id"] for item in listed.json["stuck_events"]] == [account]


def test_the_web_process_routes_each_id_as_its_client_sent_it(runtime, accounts: Accounts, tmp_path):
    """gunicorn (gevent workers, as the Procfile runs it) decodes %2F into PATH_INFO too, and hands
    the path as sent in RAW_URI: "x%2Fstate" is the page of "x/state" there as well. Paths go out
    as they are (http.client; requests would turn %2E%2E back into '..')."""
    for account in ("x", "x/state", "acct/1", ".."):
        accounts.create(account_id=account)
    service, support = "svc-ids-" + os.urandom(6).hex(), "sup-ids-" + os.urandom(6).hex()
    with web_process(runtime.settings, tmp_path, WEB_CONCURRENCY="1", SERVICE_TOKENS=service,
                     SUPPORT_TOKENS=f"alice:{support}") as web:
        def get(path: str, token: str) -> tuple[int, str]:
            conn = http.client.HTTPConnection(web.base.removeprefix("http://"), timeout=30)
            try:
                conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
                answer = conn.getresponse()
                return answer.status, answer.read().decode()
            finally:
                conn.close()

        status, body = get("/accounts/acct%2F1/dunning", service)
        assert status == 200 and json.loads(body)["account_id"] == "acct/1"
        status, body = get("/support/accounts/x%2Fstate", support)
        assert status == 200 and shown("x/state") in body
        status, body = get("/support/accounts/x/state", support)
        assert status == 200 and json.loads(body)["dunning"]["account_id"] == "x"
        status, body = get("/support/accounts/%2E%2E", support)
        assert status == 200 and shown("..") in body
        for path in ("/support/account?id=..", "/support/account?id=%2E%2E"):  # the form browsers can send
            status, body = get(path, support)
            assert status == 200 and shown("..") in body
        status, body = get("/support/account?id=x%2Fstate", support)
        assert status == 200 and shown("x/state") in body
