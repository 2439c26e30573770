"""GET /accounts/<id>/dunning, GET /accounts/<id>/billing-history and the support page against
DESIGN sections 4, 7 and 11: every contract key with its type, a never-recomputed account with no
invoices, an unknown one, and the reasons shown with the facts they matched on."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

from markupsafe import escape

from app.recompute.service import run_recompute
from tests.conftest import SUPPORT_TOKEN, Accounts, post_event, service_headers
from tests.stripe_events import event, unique, with_product

SUPPORT = {"Authorization": f"Bearer {SUPPORT_TOKEN}"}
DAY = 86400
MARKUP = '<img src=x onerror="alert(1)">'

# DESIGN section 11: the keys of GET /accounts/<id>/dunning and their JSON types.
DUNNING_KEYS = {"account_id": (str,), "status": (str,), "level": (str,), "failure_class": (str, type(None)),
                "next_retry_at": (str, type(None)), "retries_used": (int,), "bad_debt": (bool,),
                "reasons": (list,), "entitlements": (dict,), "version": (int,)}


def test_a_never_recomputed_account_with_no_invoices_answers_every_contract_key(client, accounts: Accounts):
    account, _ = accounts.create()
    body = client.get(f"/accounts/{account}/dunning", headers=service_headers()).json
    for key, types in DUNNING_KEYS.items():
        assert isinstance(body[key], types), key
    assert (body["account_id"], body["status"], body["level"], body["version"]) == (account, "current", "none", 0)
    assert (body["reasons"], body["bad_debt"], body["retries_used"]) == ([], False, 0)
    history = client.get(f"/accounts/{account}/billing-history", headers=service_headers())
    assert (history.status_code, history.json) == (200, {"account_id": account, "invoices": []})
    page = client.get(f"/support/accounts/{account}", headers=SUPPORT).get_data(as_text=True)
    assert re.search(r'id="status">current<', page) and re.search(r'id="version">0<', page)
    assert "none recorded yet" in page and "no invoices" in page and 'id="recompute"' in page


def test_an_unknown_account_is_a_404_with_its_reason_everywhere(client, clean):
    for path, headers in (("/accounts/acct_nobody/dunning", service_headers()),
                          ("/accounts/acct_nobody/billing-history", service_headers()),
                          ("/support/accounts/acct_nobody/state", SUPPORT)):
        response = client.get(path, headers=headers)
        assert (response.status_code, response.json) == (404, {"error": "not_found",
                                                                "reason": "no account 'acct_nobody'"}), path
    page = client.get("/support/accounts/acct_nobody", headers=SUPPORT)
    assert page.status_code == 404 and "No account acct_nobody" in page.get_data(as_text=True)


def test_the_support_page_shows_each_reason_with_the_facts_it_matched_on(client, engine, runtime,
                                                                         accounts: Accounts):
    """DESIGN 4: every decision carries its reasons (which rule matched, on which facts), shown by the
    API and the support page. The page showed the rule and its wording only: support could not
    tell which invoice matched which level, nor which products a lines.incomplete reason knew."""
    account, customer = accounts.create()
    t = int(time.time()) - 8 * DAY
    invoice = unique("in")
    evt = with_product(event("invoice.payment_failed", id=invoice, customer=customer, created=t, amount_due=5000,
                             amount_remaining=5000, amount_paid=0, total=5000, attempt_count=1,
                             billing_reason="subscription_cycle", paths={"created": t - DAY, "lines.has_more": True}),
                       f"prod_{MARKUP}", 5000)
    assert post_event(client, evt).status_code == 200
    run_recompute(engine, runtime.policy, account, "MANUAL", datetime.now(UTC))

    api = client.get(f"/accounts/{account}/dunning", headers=service_headers()).json
    stored = {r["rule"]: r["facts"] for r in api["reasons"]}
    assert stored["level.restrict_premium"]["invoice"] == invoice
    assert stored["lines.incomplete"]["products_known"] == [f"prod_{MARKUP}"]

    page = client.get(f"/support/accounts/{account}", headers=SUPPORT).get_data(as_text=True)
    reasons = re.search(r'<ul id="reasons">(.*?)</ul>', page, re.DOTALL)
    assert reasons is not None
    [level] = [li for li in re.findall(r"<li>(.*?)</li>", reasons.group(1), re.DOTALL)
               if "level.restrict_premium" in li]
    assert f"invoice={invoice}" in level and "unpaid_since=" in level and "failure_class=unknown" in level
    [lines] = [li for li in re.findall(r"<li>(.*?)</li>", reasons.group(1), re.DOTALL) if "lines.incomplete" in li]
    assert MARKUP not in page  # a product id from Stripe is text, never markup
    assert str(escape(f"prod_{MARKUP}")) in lines or "prod_\\u003cimg" in lines
