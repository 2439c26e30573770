"""What an account owes, per currency: amounts in different currencies never add up.

An account of several Stripe customers may be billed in several currencies. 1000 USD and 1000 EUR
owed is no "2000": ``outstanding`` lists each currency's amount, and ``outstanding_amount`` (kept
for the callers that read it) is given only when the debt is in one currency (0 when nothing is
owed), else null with ``outstanding_amount_reason`` saying why.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime

from app.recompute.service import run_recompute
from tests.conftest import SUPPORT_TOKEN, Accounts, post_event, service_headers
from tests.integration.test_cli_recompute import dunning
from tests.stripe_events import event, unique, with_product

DAY = 86400
SUPPORT = {"Authorization": f"Bearer {SUPPORT_TOKEN}"}


def failed_in(client, customer: str, currency: str, amount: int, days_ago: int = 4) -> str:
    t = int(time.time()) - days_ago * DAY
    invoice = unique("in")
    evt = with_product(event("invoice.payment_failed", id=invoice, customer=customer, created=t, currency=currency,
                             amount_due=amount, amount_remaining=amount, amount_paid=0, total=amount,
                             attempt_count=1, billing_reason="subscription_cycle", paths={"created": t - DAY}),
                       "prod_core", amount)
    assert post_event(client, evt).status_code == 200
    return invoice


def recomputed(engine, runtime, account: str) -> None:
    run_recompute(engine, runtime.policy, account, "MANUAL", datetime.now(UTC))


def view(client, account: str) -> dict:
    response = client.get(f"/accounts/{account}/dunning", headers=service_headers())
    assert response.status_code == 200
    return response.json


def test_a_debt_in_two_currencies_has_no_single_amount_but_one_per_currency(client, engine, runtime,
                                                                          accounts: Accounts):
    account, customer = accounts.create()
    failed_in(client, customer, "usd", 1000)
    failed_in(client, customer, "eur", 1000)
    recomputed(engine, runtime, account)

    body = view(client, account)
    assert body["status"] == "past_due"
    assert body["outstanding_amount"] is None  # never 2000: there is no such sum
    assert body["outstanding_currency"] is None
    assert body["outstanding"] == [{"currency": "eur", "amount": 1000}, {"currency": "usd", "amount": 1000}]
    assert "several currencies" in body["outstanding_amount_reason"]

    state = client.get(f"/support/accounts/{account}/state", headers=SUPPORT).json
    assert state["dunning"]["outstanding"] == body["outstanding"]
    page = client.get(f"/support/accounts/{account}", headers=SUPPORT).get_data(as_text=True)
    shown = re.search(r'<dd id="outstanding">(.*?)</dd>', page, re.DOTALL)
    assert shown is not None
    assert "20.00" not in shown.group(1) and "2000" not in shown.group(1)
    # In major units of each currency (app/money.py): 1000 minor units are 10.00, never "1000 usd".
    assert "10.00 EUR" in shown.group(1) and "10.00 USD" in shown.group(1)
    assert "1000" not in shown.group(1)
    # Each invoice's amounts are in its own currency.
    assert re.search(r">10\.00 EUR<", page) and re.search(r">10\.00 USD<", page)


def test_a_debt_in_one_currency_keeps_its_amount_and_says_its_currency(client, engine, runtime, accounts: Accounts):
    account, customer = accounts.create()
    failed_in(client, customer, "eur", 700)
    failed_in(client, customer, "eur", 300)
    recomputed(engine, runtime, account)

    body = view(client, account)
    assert body["outstanding_amount"] == 1000
    assert body["outstanding_currency"] == "eur"
    assert body["outstanding"] == [{"currency": "eur", "amount": 1000}]
    assert body["outstanding_amount_reason"] is None
    page = client.get(f"/support/accounts/{account}", headers=SUPPORT).get_data(as_text=True)
    assert re.search(r'<dd id="outstanding">\s*10\.00 EUR\s*</dd>', page)


def test_nothing_owed_is_zero_in_no_currency(client, engine, runtime, accounts: Accounts):
    account, _customer = accounts.create()
    never = view(client, account)  # never recomputed: nothing stored, nothing owed
    recomputed(engine, runtime, account)
    body = view(client, account)
    for answer in (never, body):
        assert answer["outstanding_amount"] == 0
        assert answer["outstanding"] == []
        assert answer["outstanding_currency"] is None and answer["outstanding_amount_reason"] is None


def test_cli_recompute_prints_the_debt_per_currency(client, accounts: Accounts, database_url, engine):
    account, customer = accounts.create()
    failed_in(client, customer, "usd", 1000)
    failed_in(client, customer, "eur", 1000)
    done = dunning("recompute", account, database_url=database_url)
    assert done.returncode == 0, done.stderr
    assert "outstanding: 10.00 EUR, 10.00 USD" in done.stdout  # the JSON below keeps the minor units
    again = json.loads(dunning("recompute", account, "--json", database_url=database_url).stdout)
    assert again["outstanding"] == [{"currency": "eur", "amount": 1000}, {"currency": "usd", "amount": 1000}]
    assert again["outstanding_amount"] is None


def test_a_bad_debt_amount_refused_names_the_balance_with_its_currency(client, debtor, stripe_fake):
    from tests.integration.bad_debt_setup import key, pay

    body = view(client, debtor.account)
    assert (body["outstanding_amount"], body["outstanding_currency"]) == (debtor.amount, "usd")
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount + 1}, key())
    assert (response.status_code, response.json["error"]) == (422, "amount_mismatch")
    assert response.json["outstanding_amount"] == debtor.amount
    assert response.json["outstanding_currency"] == "usd" and "10.00 USD" in response.json["reason"]


def test_a_payment_stuck_in_lifting_is_listed_with_its_currency(client, engine, accounts: Accounts):
    from datetime import timedelta

    account, _ = accounts.create()
    since = datetime.now(UTC) - timedelta(minutes=45)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO subs_dunning (account_id, status, level, changed_at) "
                             "VALUES (%(a)s, 'lifting', 'suspended', %(t)s)", {"a": account, "t": since})
        conn.exec_driver_sql("INSERT INTO bad_debt_payment (account_id, idempotency_key, request_fingerprint, amount, "
                             "currency, created_at) VALUES (%(a)s, %(k)s, 'x', 5000, 'eur', %(t)s)",
                             {"a": account, "k": f"key-{account}", "t": since})
    listing = client.get("/support/lifting", headers=SUPPORT).get_data(as_text=True)
    assert re.search(r"<td>50\.00 EUR</td>", listing)
    [item] = client.get("/ops/lifting", headers=service_headers()).json["accounts"]
    assert (item["amount"], item["currency"]) == (5000, "eur")


def test_a_bad_debt_now_owed_in_another_currency_is_not_paid_on_the_stored_amount(client, engine, debtor,
                                                                               stripe_fake):
    """/pay-bad-debt takes an amount, no currency: the caller quotes outstanding_amount (and its
    currency) as stored. Its debt in USD voided and as much now owed in EUR, the recompute not run
    yet: the same number is no longer the same balance, so the request is refused as stale instead of
    charging 1000 EUR for a quote of 1000 USD."""
    from tests.integration.bad_debt_setup import key, pay

    assert view(client, debtor.account)["outstanding"] == [{"currency": "usd", "amount": debtor.amount}]
    t = int(time.time()) - 30 * DAY
    voided = event("invoice.voided", id=debtor.invoice, customer=debtor.customer, amount_remaining=0,
                   created=int(time.time()))
    assert post_event(client, voided).status_code == 200
    euros = with_product(event("invoice.marked_uncollectible", id=unique("in"), customer=debtor.customer, created=t,
                               amount_due=debtor.amount, amount_remaining=debtor.amount, amount_paid=0,
                               total=debtor.amount, currency="eur", paths={"created": t - DAY}),
                         "prod_premium", debtor.amount)
    assert post_event(client, euros).status_code == 200
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert (response.status_code, response.json["error"]) == (409, "balance_changing")
    assert stripe_fake.intents_created() == []


def test_the_page_shows_each_currency_with_its_own_exponent_and_the_api_keeps_minor_units(client, engine, runtime,
                                                                                         accounts: Accounts):
    """Stripe's 5000 is ¥5000 in JPY (zero-decimal), 1500 is 1.500 KWD (three-decimal): the page says so,
    where it said "5000 jpy" beside "1500 kwd" as if both were minor units of two decimals."""
    account, customer = accounts.create()
    failed_in(client, customer, "jpy", 5000)
    failed_in(client, customer, "kwd", 1500)
    recomputed(engine, runtime, account)

    page = client.get(f"/support/accounts/{account}", headers=SUPPORT).get_data(as_text=True)
    shown = re.search(r'<dd id="outstanding">(.*?)</dd>', page, re.DOTALL)
    assert shown is not None and shown.group(1).strip() == "5000 JPY, 1.500 KWD"
    assert re.search(r">5000 JPY<", page) and re.search(r">1\.500 KWD<", page)
    state = client.get(f"/support/accounts/{account}/state", headers=SUPPORT).json
    assert state["dunning"]["outstanding"] == [{"currency": "jpy", "amount": 5000}, {"currency": "kwd", "amount": 1500}]
    assert sorted(i["amount_due"] for i in state["invoices"]) == [1500, 5000]


def test_a_reasons_balance_and_threshold_are_shown_in_the_invoices_currency(client, engine, runtime,
                                                                           accounts: Accounts, database_url):
    """The small-balance cap's reason compares the balance with the policy's threshold (500 minor units
    by default): the page and `dunning recompute` show both in major units; the API keeps the integers."""
    account, customer = accounts.create()
    failed_in(client, customer, "usd", 450, days_ago=10)
    recomputed(engine, runtime, account)

    [small] = [r for r in view(client, account)["reasons"] if r["rule"] == "balance.small"]
    assert (small["facts"]["balance"], small["facts"]["threshold"], small["facts"]["currency"]) == (450, 500, "usd")
    page = client.get(f"/support/accounts/{account}", headers=SUPPORT).get_data(as_text=True)
    assert "balance=4.50 USD" in page and "threshold=5.00 USD" in page and "balance=450" not in page
    done = dunning("recompute", account, database_url=database_url)
    assert done.returncode == 0, done.stderr
    assert "outstanding: 4.50 USD" in done.stdout
    assert "balance=4.50 USD" in done.stdout and "threshold=5.00 USD" in done.stdout
