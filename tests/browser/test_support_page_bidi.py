"""Text from Stripe and other teams on the support page, in a real headless Chromium: a direction
override left open in one product id (U+202E RIGHT-TO-LEFT OVERRIDE, never closed) turns round only
that id, not the products listed after it in the same cell."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.browser.test_support_page_refresh import signed_in_page
from tests.conftest import Accounts
from tests.stripe_events import unique

pytestmark = [pytest.mark.browser]

# Where the first and the last letter of a word are drawn in the cell (left edges), by a Range over
# the text node that holds it (the page's own markup, whatever elements it uses). Text drawn left to
# right has its first letter left of its last; a run turned round the other way, on any line.
LETTERS = """([selector, word]) => {
  const cell = document.querySelector(selector);
  const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const at = node.data.indexOf(word);
    if (at < 0) { continue; }
    const left = (i) => {
      const range = document.createRange();
      range.setStart(node, i);
      range.setEnd(node, i + 1);
      return range.getBoundingClientRect().left;
    };
    return [left(at), left(at + word.length - 1)];
  }
  return null;
}"""


def test_a_product_id_holding_an_open_override_does_not_turn_round_the_next_one(
        browser: Any, live_server: str, engine: Engine, accounts: Accounts) -> None:
    # Both products were in one run of text: Chromium drew "prod_" then "eroc_dorp ,ba", so the
    # page showed a product that does not exist and not prod_core.
    account, customer = accounts.create()
    lines = json.dumps([{"product": "prod_\u202eab", "amount": 100}, {"product": "prod_core", "amount": 100}])
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO stripe_invoice (id, stripe_customer_id, status, amount_due, amount_remaining, created, "
            "lines, source_created, source_rank, source_event_id) "
            "VALUES (%(i)s, %(c)s, 'open', 200, 200, now() - interval '2 days', %(l)s, 1, 1, 'evt_bidi')",
            {"i": unique("in"), "c": customer, "l": lines})
    context, page = signed_in_page(browser, live_server, account)
    try:
        products = "#invoices tr:nth-child(2) td:nth-child(8)"
        assert page.text_content(products) == "prod_\u202eab, prod_core"
        first, last = page.evaluate(LETTERS, [products, "prod_core"])
        assert first < last  # "prod_core", not "eroc_dorp"
        first, last = page.evaluate(LETTERS, [products, "ab"])  # the override still turns its own id round
        assert first > last
    finally:
        context.close()
