"""NinjaPanel: support auth, the recompute button's endpoint and task status, audit rows, the page."""

from __future__ import annotations

import html
import re
import uuid
from typing import Any
from urllib.parse import quote

import pytest
from flask import Flask
from flask.testing import FlaskClient
from freezegun import freeze_time
from sqlalchemy import Engine

from tests.conftest import SUPPORT_ACTOR, SUPPORT_TOKEN, Accounts, post_event, wait_for
from tests.stripe_events import event, unique

SUPPORT = {"Authorization": f"Bearer {SUPPORT_TOKEN}"}


def json_of(response: Any) -> Any:
    """A JSON answer's body (the test client types it as possibly None)."""
    assert response.json is not None, response.get_data(as_text=True)
    return response.json


def audit_rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT actor, action, account_id, detail FROM audit_log ORDER BY id").mappings()
        return [dict(r) for r in rows]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {SUPPORT_TOKEN}"},
                                     {"Authorization": f"Bearer {SUPPORT_TOKEN}x"}])
def test_no_or_wrong_token_is_401_and_nothing_is_queued_or_audited(client: FlaskClient, engine, accounts, headers):
    account, _ = accounts.create()
    response = client.post(f"/support/accounts/{account}/recompute", headers=headers)
    assert response.json is not None
    assert response.status_code == 401 and response.json["reason"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get(f"/support/accounts/{account}/state", headers=headers).status_code == 401
    assert client.get(f"/support/tasks/{uuid.uuid4()}", headers=headers).status_code == 401
    assert audit_rows(engine) == []


def test_a_service_token_is_not_a_support_token(client, accounts):
    from tests.conftest import service_headers

    account, _ = accounts.create()
    assert client.post(f"/support/accounts/{account}/recompute", headers=service_headers()).status_code == 401


def test_unknown_account_is_404(client, engine, clean):
    response = client.post("/support/accounts/acct_nobody/recompute", headers=SUPPORT)
    assert response.status_code == 404 and "acct_nobody" in response.json["reason"]
    assert client.get("/support/accounts/acct_nobody/state", headers=SUPPORT).status_code == 404
    assert client.get("/support/accounts/acct_nobody", headers=SUPPORT).status_code == 404
    assert audit_rows(engine) == []


def test_unknown_task_is_404(client, clean):
    assert client.get(f"/support/tasks/{uuid.uuid4()}", headers=SUPPORT).status_code == 404
    assert client.get("/support/tasks/not-a-task", headers=SUPPORT).status_code == 404


def test_the_button_is_audited_before_anything_is_queued_and_a_broker_outage_says_so(settings, runtime, engine,
                                                                                     accounts):
    from app import create_app
    from tasks.factory import make_celery

    account, _ = accounts.create()
    dead_broker = make_celery(settings.with_overrides(broker_url="redis://127.0.0.1:1/0"))
    response = create_app(settings, runtime=runtime, celery=dead_broker).test_client().post(
        f"/support/accounts/{account}/recompute", headers=SUPPORT)
    assert response.status_code == 503 and response.headers["Retry-After"]
    [row] = audit_rows(engine)
    assert (row["actor"], row["action"], row["account_id"]) == (SUPPORT_ACTOR, "recompute", account)
    assert row["detail"]["queued"] is False and row["detail"]["task_id"]


def failed_invoice_mirrored(engine: Engine, customer: str) -> None:
    """An open invoice of 5000 that failed a day ago, as the mirror files it, for ``customer``."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO stripe_invoice (id, stripe_customer_id, status, amount_due, amount_remaining, created, "
            "first_failed_at, last_failed_at, source_created, source_rank, source_event_id) "
            "VALUES (%(i)s, %(c)s, 'open', 5000, 5000, now() - interval '2 days', now() - interval '1 day', "
            "now() - interval '1 day', 1, 1, 'evt_x')", {"i": unique("in"), "c": customer})


@pytest.mark.worker
def test_recompute_button_queues_a_ninjapanel_recompute_audits_the_actor_and_reports_the_result(
        client: FlaskClient, engine: Engine, accounts: Accounts, worker):
    account, customer = accounts.create()
    # The mirror knows of a failed invoice that this account's stored state does not show yet.
    failed_invoice_mirrored(engine, customer)
    response = client.post(f"/support/accounts/{account}/recompute", headers=SUPPORT)
    assert response.status_code == 202
    assert response.json is not None
    task_id = response.json["task_id"]
    assert response.json["status_url"] == f"/support/tasks/{task_id}"

    [row] = audit_rows(engine)
    assert row["actor"] == SUPPORT_ACTOR and row["action"] == "recompute" and row["account_id"] == account
    assert row["detail"] == {"task_id": task_id, "trigger": "NINJAPANEL_BUTTON"}

    def done() -> Any:
        status = client.get(f"/support/tasks/{task_id}", headers=SUPPORT)
        assert status.status_code == 200
        assert status.json is not None
        return status.json if status.json["done"] else None

    status = wait_for(done, message="support recompute task")
    assert status["state"] == "SUCCESS" and status["account_id"] == account
    assert status["result"]["trigger"] == "NINJAPANEL_BUTTON" and status["result"]["outcome"] == "changed"
    assert status["result"]["status"] == "past_due" and status["result"]["cause"] == f"support:{SUPPORT_ACTOR}"
    view = json_of(client.get(f"/support/accounts/{account}/state", headers=SUPPORT))
    assert view["dunning"]["status"] == "past_due" and view["dunning"]["last_trigger"] == "NINJAPANEL_BUTTON"

    # Pressed again with nothing new: still a forced run (not coalesced away), and it changes nothing.
    again = json_of(client.post(f"/support/accounts/{account}/recompute", headers=SUPPORT))["task_id"]
    wait_for(lambda: json_of(client.get(f"/support/tasks/{again}", headers=SUPPORT))["state"] == "SUCCESS",
             message="second press")
    assert json_of(client.get(f"/support/tasks/{again}", headers=SUPPORT))["result"]["outcome"] == "unchanged"
    assert [r["action"] for r in audit_rows(engine)] == ["recompute", "recompute"]


def test_page_without_credentials_is_401_with_the_sign_in_form(client, accounts):
    account, _ = accounts.create()
    response = client.get(f"/support/accounts/{account}")
    assert response.status_code == 401
    assert b'name="token"' in response.data and f'value="/support/accounts/{account}"'.encode() in response.data


def test_page_shows_state_invoices_with_labels_episodes_and_stuck_work(client, engine, runtime, accounts):
    from tests.integration.bad_debt_setup import into_bad_debt

    debt = into_bad_debt(client, engine, runtime, accounts)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO subs_stuck_events (account_id, task_name, error_class, error, state) "
                             "VALUES (%(a)s, 'tasks.recompute_account', 'database_unavailable', 'boom', 'dead')",
                             {"a": debt.account})
    page = client.get(f"/support/accounts/{debt.account}", headers=SUPPORT)
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert re.search(r'id="status">bad_debt<', html) and re.search(r'id="level">suspended<', html)
    assert debt.invoice in html and "Uncollectible" in html
    assert "marked_uncollectible" in html  # the episode's reason and the decision's reasons
    assert "tasks.recompute_account" in html and "database_unavailable" in html
    assert 'id="recompute"' in html and "/static/support.js" in html
    assert client.get("/static/support.js").status_code == 200


@pytest.mark.parametrize(("base_url", "secure"), [("https://support.example", True), ("http://localhost", False)])
def test_the_session_cookie_is_secure_when_signed_in_over_https(flask_app, accounts, base_url, secure):
    """Signed in over https (or behind a proxy gunicorn trusts to say so), the cookie is never sent
    over plain http, where anyone on the path could take the session; over plain http (make run on
    localhost) a Secure cookie would never come back, so it is not marked."""
    client = flask_app.test_client()
    account, _ = accounts.create()
    ok = client.post("/support/login", base_url=base_url,
                     data={"token": SUPPORT_TOKEN, "next": f"/support/accounts/{account}"})
    assert ok.status_code == 303
    assert ("; Secure" in ok.headers["Set-Cookie"]) is secure


def test_sign_in_keeps_a_session_and_cookie_writes_need_the_csrf_header(flask_app, engine, accounts):
    client = flask_app.test_client()
    account, _ = accounts.create()
    wrong = client.post("/support/login", data={"token": "nope", "next": f"/support/accounts/{account}"})
    assert wrong.status_code == 401 and b"not valid" in wrong.data
    ok = client.post("/support/login", data={"token": SUPPORT_TOKEN, "next": f"/support/accounts/{account}"})
    assert ok.status_code == 303 and ok.headers["Location"].endswith(f"/support/accounts/{account}")
    cookie = ok.headers["Set-Cookie"]
    assert SUPPORT_TOKEN not in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    page = client.get(f"/support/accounts/{account}")
    assert page.status_code == 200
    csrf = re.search(r'data-csrf="([^"]+)"', page.get_data(as_text=True))
    assert csrf
    assert client.post(f"/support/accounts/{account}/recompute").status_code == 403
    queued = client.post(f"/support/accounts/{account}/recompute", headers={"X-Support-CSRF": csrf.group(1)})
    assert queued.status_code == 202
    assert [(r["actor"], r["action"]) for r in audit_rows(engine)] == [(SUPPORT_ACTOR, "sign_in"),
                                                                      (SUPPORT_ACTOR, "recompute")]
    client.post("/support/logout")
    assert client.get(f"/support/accounts/{account}").status_code == 401


def test_a_session_lasts_twelve_hours_from_its_sign_in_however_it_is_used(flask_app, accounts):
    # The cookie is signed, not stored: without an age of its own a copy of it lasted as long as the token.
    client = flask_app.test_client()
    account, _ = accounts.create()
    page = f"/support/accounts/{account}"
    with freeze_time("2026-12-01 08:00:00") as clock:
        assert client.post("/support/login", data={"token": SUPPORT_TOKEN, "next": page}).status_code == 303
        clock.tick(6 * 3600)
        assert client.get(page).status_code == 200  # in use meanwhile: it does not extend the session
        # 12 hours at most whichever host's clock dated it: by its own host's, the skew rule's 5 minutes
        # less (test_support_session_skew.py).
        clock.tick(6 * 3600 - 300 - 1)
        assert client.get(page).status_code == 200
        clock.tick(1)
        expired = client.get(page)
        assert expired.status_code == 401 and 'name="token"' in expired.get_data(as_text=True)
        assert client.post(f"/support/accounts/{account}/recompute").status_code == 401
        # Signing in again starts a new one.
        assert client.post("/support/login", data={"token": SUPPORT_TOKEN, "next": page}).status_code == 303
        assert client.get(page).status_code == 200


def signed_in_with_a_copy(flask_app: Flask, accounts: Accounts) -> tuple[FlaskClient, FlaskClient, str]:
    """A browser signed in on an account's page, another client holding a copy of its session
    cookie (another tab's, or a stolen one), and the page."""
    browser = flask_app.test_client()
    account, _ = accounts.create()
    page = f"/support/accounts/{account}"
    assert browser.post("/support/login", data={"token": SUPPORT_TOKEN, "next": page}).status_code == 303
    copied = browser.get_cookie("session")
    assert copied is not None
    other = flask_app.test_client()
    other.set_cookie("session", copied.value)
    return browser, other, page


def test_signing_out_ends_the_session_for_every_copy_of_its_cookie(flask_app, engine, accounts):
    # The cookie is signed, not stored: signing out only dropped the browser's copy, and a copy
    # taken before (another tab's, or a stolen one) went on working.
    browser, other, page = signed_in_with_a_copy(flask_app, accounts)
    assert other.get(page).status_code == 200
    assert browser.post("/support/logout").status_code == 303
    assert browser.get(page).status_code == 401
    assert other.get(page).status_code == 401
    assert other.post("/support/logout").status_code == 303  # signing out of an ended session: nothing to do
    assert [(r["actor"], r["action"]) for r in audit_rows(engine)] == [(SUPPORT_ACTOR, "sign_in"),
                                                                      (SUPPORT_ACTOR, "sign_out")]
    # A new sign-in is a new session.
    assert browser.post("/support/login", data={"token": SUPPORT_TOKEN, "next": page}).status_code == 303
    assert browser.get(page).status_code == 200 and other.get(page).status_code == 401


def test_a_sign_out_the_database_refused_keeps_the_session_so_signing_out_again_ends_it(flask_app, engine,
                                                                                         accounts):
    # The browser's copy was dropped before the sign-out was recorded: after the 503, signing out
    # again found no session and said nothing, while a copy of the cookie went on working.
    browser, other, page = signed_in_with_a_copy(flask_app, accounts)
    with engine.connect() as holder:
        # Reads go on (the session is checked); the sign-out's INSERT waits, then times out.
        holder.exec_driver_sql("LOCK TABLE support_session_ended IN SHARE MODE")
        assert browser.post("/support/logout").status_code == 503
        holder.rollback()
    assert browser.get(page).status_code == 200  # still signed in: the sign-out did not happen
    assert browser.post("/support/logout").status_code == 303
    assert other.get(page).status_code == 401
    assert browser.get(page).status_code == 401


def test_a_sign_out_whose_audit_the_database_refused_did_not_happen(flask_app, engine, accounts):
    # The end was recorded and the cookie dropped in one transaction, the audit row in another: a
    # refused audit left a session ended (and the cookie gone) that the audit log never showed.
    browser, other, page = signed_in_with_a_copy(flask_app, accounts)
    with engine.connect() as holder:
        holder.exec_driver_sql("LOCK TABLE audit_log IN SHARE MODE")  # its INSERT waits, then times out
        assert browser.post("/support/logout").status_code == 503
        holder.rollback()
    assert other.get(page).status_code == 200 and browser.get(page).status_code == 200
    assert [r["action"] for r in audit_rows(engine)] == ["sign_in"]
    assert browser.post("/support/logout").status_code == 303
    assert other.get(page).status_code == 401
    assert [(r["actor"], r["action"]) for r in audit_rows(engine)] == [(SUPPORT_ACTOR, "sign_in"),
                                                                      (SUPPORT_ACTOR, "sign_out")]


def test_a_sign_in_whose_audit_the_database_refused_did_not_happen(flask_app, engine, accounts):
    # The session was put in the cookie before the sign_in audit row was written, in its own
    # transaction: a refused audit answered 503 and still signed the browser in, unaudited.
    browser = flask_app.test_client()
    account, _ = accounts.create()
    page = f"/support/accounts/{account}"
    with engine.connect() as holder:
        holder.exec_driver_sql("LOCK TABLE audit_log IN SHARE MODE")  # its INSERT waits, then times out
        refused = browser.post("/support/login", data={"token": SUPPORT_TOKEN, "next": page})
        holder.rollback()
    assert refused.status_code == 503
    assert browser.get_cookie("session") is None and browser.get(page).status_code == 401
    assert audit_rows(engine) == []
    assert browser.post("/support/login", data={"token": SUPPORT_TOKEN, "next": page}).status_code == 303
    assert browser.get(page).status_code == 200
    assert [(r["actor"], r["action"]) for r in audit_rows(engine)] == [(SUPPORT_ACTOR, "sign_in")]


def test_a_sign_in_replacing_a_session_whose_audit_was_refused_keeps_the_old_one(flask_app, engine, accounts):
    # Ending the replaced session and auditing the new sign-in are one transaction: neither happened.
    browser, other, page = signed_in_with_a_copy(flask_app, accounts)
    with engine.connect() as holder:
        holder.exec_driver_sql("LOCK TABLE audit_log IN SHARE MODE")
        assert browser.post("/support/login", data={"token": SUPPORT_TOKEN, "next": page}).status_code == 503
        holder.rollback()
    assert browser.get(page).status_code == 200 and other.get(page).status_code == 200
    assert [r["action"] for r in audit_rows(engine)] == ["sign_in"]


def test_signing_in_again_ends_the_session_it_replaces(flask_app, engine, accounts):
    # The new sign-in replaced the browser's session without ending it: signing out then ended the
    # new one only, and a copy of the first cookie went on working for the rest of its 12 hours.
    browser, other, page = signed_in_with_a_copy(flask_app, accounts)
    assert browser.post("/support/login", data={"token": SUPPORT_TOKEN, "next": page}).status_code == 303
    assert browser.post("/support/logout").status_code == 303
    assert browser.get(page).status_code == 401
    assert other.get(page).status_code == 401


def test_a_cookie_write_with_a_non_ascii_csrf_header_is_403(flask_app, engine, accounts):
    # secrets.compare_digest raised TypeError on a str with non-ASCII characters: a 500.
    client = flask_app.test_client()
    account, _ = accounts.create()
    assert client.post("/support/login", data={"token": SUPPORT_TOKEN, "next": "/support/x"}).status_code == 303
    for sent in ("\u00e9", "\u00ff" * 32):
        response = client.post(f"/support/accounts/{account}/recompute", headers={"X-Support-CSRF": sent})
        assert response.status_code == 403, response.get_data(as_text=True)
        assert "X-Support-CSRF" in response.json["reason"]
    assert [r["action"] for r in audit_rows(engine)] == ["sign_in"]


def test_sign_in_comes_back_to_the_page_of_an_account_whose_id_needs_escaping(flask_app, accounts):
    # The form's next held the decoded path: signing in from acct#1?x%2F's page led to "acct".
    client = flask_app.test_client()
    account, _ = accounts.create(account_id=unique("acct") + "#1?x%2F \u00e9")
    signs_in_back_to(client, "/support/accounts/" + quote(account), account)


def signs_in_back_to(client: FlaskClient, path: str, account: str) -> None:
    """Without a session, ``path`` (the page of ``account``) answers the sign-in form, whose way back
    is ``path`` itself; signing in there comes back to that account's page."""
    form = client.get(path)
    assert form.status_code == 401
    target = re.search(r'name="next" value="([^"]*)"', form.get_data(as_text=True))
    assert target and html.unescape(target.group(1)) == path
    signed_in = client.post("/support/login", data={"token": SUPPORT_TOKEN, "next": html.unescape(target.group(1))})
    assert signed_in.status_code == 303 and signed_in.headers["Location"].endswith(path)
    page = client.get(signed_in.headers["Location"])
    assert page.status_code == 200 and f"Account <code>{html.escape(account)}</code>" in page.get_data(as_text=True)


def test_sign_in_never_redirects_off_the_support_pages(flask_app, clean):
    client = flask_app.test_client()
    response = client.post("/support/login", data={"token": SUPPORT_TOKEN, "next": "https://evil.example/x"})
    assert response.status_code == 303 and response.headers["Location"].endswith("/support/login")


@pytest.mark.parametrize("target", ["//[/support/x", "http://[::1/support/x", "//a]/support/x"])
def test_a_next_that_is_no_url_goes_to_the_sign_in_form_not_a_500(flask_app, clean, target):
    # urlparse raises ValueError ("Invalid IPv6 URL") on an unclosed '[': the form and the sign-in
    # answered 500.
    client = flask_app.test_client()
    form = client.get("/support/login", query_string={"next": target})
    assert form.status_code == 200 and 'name="next" value="/support/login"' in form.get_data(as_text=True)
    response = client.post("/support/login", data={"token": SUPPORT_TOKEN, "next": target})
    assert response.status_code == 303 and response.headers["Location"].endswith("/support/login")


def test_webhook_fed_account_appears_on_the_json_view(client, accounts):
    account, customer = accounts.create()
    assert post_event(client, event("invoice.payment_failed", customer=customer)).status_code == 200
    view = client.get(f"/support/accounts/{account}/state", headers=SUPPORT).json
    assert len(view["invoices"]) == 1 and view["invoices"][0]["label"] in ("Past due", "Open")
    assert set(view) == {"dunning", "invoices", "retries", "stuck", "episodes", "bad_debt_payments", "lifting",
                         "outbox", "totals"}


def test_the_account_page_is_read_at_one_moment(client, engine, runtime, accounts, monkeypatch):
    """A recompute commits (the invoice paid, the state's next version) while the page is being read:
    the page shows the state and the invoices of one moment, never the old state beside the new
    invoices."""
    from datetime import UTC, datetime

    from app import queries
    from app.recompute.service import run_recompute
    from app.support.queries import account_view_of

    account, customer = accounts.create()
    invoice = unique("in")
    assert post_event(client, event("invoice.payment_failed", id=invoice, customer=customer)).status_code == 200
    run_recompute(engine, runtime.policy, account, "STATE_REFRESH", datetime.now(UTC))
    real = queries.billing_history

    def a_recompute_commits_meanwhile(conn: Any, account_id: str, now: Any = None) -> Any:
        with engine.begin() as other:
            other.exec_driver_sql("UPDATE stripe_invoice SET status = 'paid', amount_paid = amount_due, "
                                  "amount_remaining = 0 WHERE id = %(i)s", {"i": invoice})
            other.exec_driver_sql("UPDATE subs_dunning SET status = 'current', version = version + 1 "
                                  "WHERE account_id = %(a)s", {"a": account})
        return real(conn, account_id, now)

    monkeypatch.setattr(queries, "billing_history", a_recompute_commits_meanwhile)
    view = account_view_of(engine, account, datetime.now(UTC), 30)
    assert view is not None
    assert (view["dunning"]["version"], view["invoices"][0]["label"]) == (1, "Past due")


def test_a_task_status_finds_its_audit_row_by_an_index(engine: Engine):
    """The support page asks for a recompute's status every 300 ms; each ask read the whole audit log."""
    from app.support.audit import TASK_ACCOUNT_SQL

    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")  # the plan the index allows, on any table size
        plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + TASK_ACCOUNT_SQL, {"task": "t-1"}))
    assert "ix_audit_log_recompute_task" in plan, plan



def test_a_moved_invoices_retries_show_on_the_page_of_the_account_that_owns_it(engine: Engine, accounts: Accounts):
    """Compute reads an invoice's retries wherever they were claimed (they follow it when another team
    moves its customer); the page shows what compute counts, not the rows the old account claimed."""
    from app.support.queries import account_view
    from tests.integration.test_mirror_filing import invoice, move

    old, customer = accounts.create()
    new, _ = accounts.create()
    moved = unique("in")
    with engine.begin() as conn:
        invoice(conn, moved, customer)
        conn.exec_driver_sql(
            "INSERT INTO payment_retry (account_id, invoice_id, retry_number, idempotency_key, scheduled_for, state) "
            "VALUES (%(a)s, %(i)s, 1, %(k)s, now(), 'failed')", {"a": old, "i": moved, "k": f"retry:{moved}:1"})
    move(engine, customer, new)
    with engine.connect() as conn:
        shown = {account: [r["invoice_id"] for r in (account_view(conn, account) or {}).get("retries", [])]
                 for account in (old, new)}
    assert shown == {old: [], new: [moved]}
