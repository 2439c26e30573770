"""The support page after the Recompute button, in a real headless Chromium: the whole page shows
the account as the recompute left it, and a result store that answers 503 while the page polls is
waited out, not reported as a failure."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.conftest import SUPPORT_TOKEN, Accounts
from tests.stripe_events import unique

pytestmark = [pytest.mark.browser, pytest.mark.worker]


def uncollectible_invoice_in_mirror_only(engine: Engine, customer: str) -> str:
    """An invoice marked uncollectible 30 days ago that no recompute has seen: the account is in bad
    debt once recomputed, and its stored state still says current."""
    invoice = unique("in")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO stripe_invoice (id, stripe_customer_id, status, amount_due, amount_remaining, created, "
            "first_failed_at, last_failed_at, marked_uncollectible_at, lines, source_created, source_rank, "
            "source_event_id) "
            "VALUES (%(i)s, %(c)s, 'uncollectible', 5000, 5000, now() - interval '40 days', "
            "now() - interval '39 days', now() - interval '39 days', now() - interval '30 days', "
            "'[{\"product\": \"prod_core\", \"amount\": 5000}]', 1, 1, 'evt_browser')", {"i": invoice, "c": customer})
    return invoice


def signed_in_page(browser: Any, live_server: str, account: str) -> tuple[Any, Any]:
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{live_server}/support/accounts/{account}")
    page.fill("#token", SUPPORT_TOKEN)
    page.click("#sign-in")
    page.wait_for_selector("#recompute")
    return context, page


def test_after_recompute_the_episodes_show_the_bad_debt_the_state_shows(
        browser: Any, live_server: str, engine: Engine, accounts: Accounts, worker: Any) -> None:
    # The button updated the state at the top only: the page said "Bad debt: yes" above an
    # episodes table saying "never in bad debt" until it was reloaded.
    account, customer = accounts.create()
    uncollectible_invoice_in_mirror_only(engine, customer)
    context, page = signed_in_page(browser, live_server, account)
    try:
        assert "never in bad debt" in page.text_content("#episodes")
        assert "nothing waiting" in page.text_content("#outbox")
        page.click("#recompute")
        page.wait_for_selector("#task-state.done", timeout=30000)  # CSP: no wait_for_function (it evals)
        assert page.text_content("#status") == "bad_debt" and page.text_content("#bad-debt") == "yes"
        episodes = page.text_content("#episodes")
        assert "never in bad debt" not in episodes
        assert "marked_uncollectible" in episodes and "open" in episodes and "prod_core" in episodes
        assert "recomputed: changed" in page.text_content("#task-state")
        # The calls to Account Management the recompute wrote (no relay runs here) are shown too.
        assert "EntitlementsChanged" in page.text_content("#outbox")
        assert "nothing waiting" not in page.text_content("#outbox")
        # The button still works on the refreshed page.
        page.click("#recompute")
        page.wait_for_selector("#task-state:text-is('recomputed: unchanged')", timeout=30000)
    finally:
        context.close()


def test_a_poll_answered_503_is_retried_until_the_task_is_done(
        browser: Any, live_server: str, engine: Engine, accounts: Accounts, worker: Any) -> None:
    # The task status answers 503 with Retry-After while the result store is unreachable; the page
    # read the error body as a task (t.state undefined) and stopped with a TypeError.
    account, customer = accounts.create()
    uncollectible_invoice_in_mirror_only(engine, customer)
    context, page = signed_in_page(browser, live_server, account)
    unavailable: list[str] = []

    def first_poll_unavailable(route: Any) -> None:
        if not unavailable:
            unavailable.append(route.request.url)
            body = '{"error": "unavailable", "reason": "the task result store is unreachable; retry later"}'
            route.fulfill(status=503, content_type="application/json", headers={"Retry-After": "1"}, body=body)
        else:
            route.continue_()

    try:
        page.route("**/support/tasks/*", first_poll_unavailable)
        page.click("#recompute")
        page.wait_for_selector("#task-state.done, #task-state.error", timeout=30000)
        assert unavailable
        assert page.text_content("#task-state") == "recomputed: changed"
        assert page.text_content("#status") == "bad_debt"
    finally:
        context.close()


def test_a_task_whose_result_is_no_longer_kept_says_so_not_that_the_recompute_failed(
        browser: Any, live_server: str, flask_app: Any, engine: Engine, accounts: Accounts, worker: Any) -> None:
    # GET /support/tasks/<id> answers EXPIRED (done) for a task requested longer ago than results are
    # kept (tests/integration/test_support_task_status.py); the page said "recompute failed: EXPIRED".
    from datetime import timedelta

    from tests.integration.test_support_task_status import RETENTION, audited_request, requested_ago

    account, customer = accounts.create()
    uncollectible_invoice_in_mirror_only(engine, customer)
    old_task = audited_request(engine, account)
    requested_ago(engine, old_task, RETENTION + timedelta(minutes=1))
    answer = flask_app.test_client().get(f"/support/tasks/{old_task}",
                                         headers={"Authorization": f"Bearer {SUPPORT_TOKEN}"})
    assert answer.json["state"] == "EXPIRED"
    context, page = signed_in_page(browser, live_server, account)
    try:
        # The page's poll gets the server's own EXPIRED answer (the page cannot wait a day).
        page.route("**/support/tasks/*", lambda route: route.fulfill(status=200, content_type="application/json",
                                                                     body=answer.get_data(as_text=True)))
        page.click("#recompute")
        page.wait_for_selector("#task-state.error", timeout=30000)
        assert page.text_content("#task-state") == answer.json["reason"]
        assert "failed" not in page.text_content("#task-state")
        assert page.is_enabled("#recompute")
    finally:
        context.close()


def test_a_failed_recompute_shows_the_stuck_work_it_left_and_says_it_failed(
        browser: Any, live_server: str, engine: Engine, accounts: Accounts, celery_app: Any) -> None:
    # A recompute given up leaves a Stuck work row (its whole error, state and next re-drive): the page
    # said "recompute failed: ..." and left every section as it was loaded, "nothing stuck" included,
    # until it was reloaded by hand.
    from tests.integration.test_support_task_status import audited_request

    account, _ = accounts.create()
    failed_task = audited_request(engine, account)
    celery_app.backend.mark_as_failure(failed_task, LookupError("account has no Stripe customer"))
    context, page = signed_in_page(browser, live_server, account)
    try:
        assert "nothing stuck" in page.text_content("#stuck")
        # What the failure left, written while the page was open.
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO subs_stuck_events (account_id, task_name, error_class, error, state) "
                                 "VALUES (%(a)s, 'tasks.recompute_account', 'invalid_data', "
                                 "'LookupError: account has no Stripe customer', 'dead')", {"a": account})
        # The button's request stands for the audited one whose task failed: the page polls the
        # server's own answer for it (no worker runs a recompute that would succeed meanwhile).
        queued = json.dumps({"task_id": failed_task, "account_id": account,
                             "status_url": f"/support/tasks/{failed_task}"})
        page.route("**/support/account/recompute*",
                   lambda route: route.fulfill(status=202, content_type="application/json", body=queued))
        page.click("#recompute")
        page.wait_for_selector("#task-state.error", timeout=30000)
        assert page.text_content("#task-state") == "recompute failed: LookupError: account has no Stripe customer"
        stuck = page.text_content("#stuck")
        assert "nothing stuck" not in stuck
        assert "tasks.recompute_account" in stuck and "invalid_data" in stuck and "dead" in stuck
        assert page.is_enabled("#recompute")
    finally:
        context.close()


def test_a_recompute_done_whose_page_could_not_be_read_again_says_it_is_done_and_the_page_is_old(
        browser: Any, live_server: str, engine: Engine, accounts: Accounts, worker: Any) -> None:
    # The refresh after a successful recompute answered 503 (the database busy for a moment): the page
    # said only "error: Error: the page answered 503", read as a failed recompute, above the state
    # from before it.
    account, customer = accounts.create()
    uncollectible_invoice_in_mirror_only(engine, customer)
    context, page = signed_in_page(browser, live_server, account)  # opened at /support/accounts/<id>
    try:
        # The refresh reads the page in its query form (/support/account?id=...): that read fails.
        page.route("**/support/account?id=*", lambda route: route.fulfill(status=503, body="busy"))
        page.click("#recompute")
        page.wait_for_selector("#task-state.done, #task-state.error", timeout=30000)
        assert page.text_content("#task-state") == (
            "recomputed: changed, but the page could not be read again (the page answered 503): what it shows is "
            "from before the recompute; reload it")
        assert page.text_content("#status") == "current"  # what the page still shows, as it says
        assert page.is_enabled("#recompute")
    finally:
        context.close()


def test_a_recompute_waiting_for_its_retry_says_why_it_failed(
        browser: Any, live_server: str, engine: Engine, accounts: Accounts, celery_app: Any) -> None:
    # GET /support/tasks/<id> answers RETRY with the failure's error (its type and first line); the page
    # said only "task retry" until its deadline, then "did not finish in time", never why.
    from tests.integration.test_support_task_status import audited_request

    account, _ = accounts.create()
    retrying_task = audited_request(engine, account)
    celery_app.backend.mark_as_retry(retrying_task, LookupError("the account's lock is held by another run"))
    context, page = signed_in_page(browser, live_server, account)
    try:
        # The button's request stands for the audited one, whose task waits for its retry: the page
        # polls the server's own answer for it.
        queued = json.dumps({"task_id": retrying_task, "account_id": account,
                             "status_url": f"/support/tasks/{retrying_task}"})
        page.route("**/support/account/recompute*",
                   lambda route: route.fulfill(status=202, content_type="application/json", body=queued))
        page.click("#recompute")
        page.wait_for_selector("#task-state:has-text('task retry')", timeout=30000)
        assert page.text_content("#task-state") == "task retry: LookupError: the account's lock is held by another run"
    finally:
        context.close()
