"""A product the account's subscriptions as mirrored do not show, known only from its invoice (a
subscription whose events never came, a one-off invoice), is restricted while the invoice is unpaid and
given back in full once it is paid: entitlements are sent whole, and a product missing from the PUT is
one Account Management may take away. Through the signed webhook, a real recompute and the outbox
relay against the fake Account Management."""

from __future__ import annotations

import time

from app.outbox.relay import relay
from tests.conftest import post_event
from tests.integration.bad_debt_setup import recompute
from tests.integration.test_journeys_journeys import invoice_event
from tests.stripe_events import unique

DAY = 86400


def test_a_product_known_only_from_its_invoice_is_given_back_in_full_once_paid(
        client, accounts, engine, runtime, fake_am):
    account, customer = accounts.create()
    invoice, now = unique("in"), int(time.time())
    # The invoice's subscription (the fixture's) is one the mirror has no event of.
    post_event(client, invoice_event("invoice.payment_failed", customer, invoice, now - 16 * DAY,
                                     product="prod_reports"))
    assert recompute(engine, runtime, account)["level"] == "limited"
    relay(engine, fake_am.url)
    assert fake_am.entitlements(account)[-1].body["entitlements"]["products"] == {"prod_reports": "read_only"}

    post_event(client, invoice_event("invoice.paid", customer, invoice, now, paid=5000, product="prod_reports",
                                     created=now - 16 * DAY - 3600))
    assert recompute(engine, runtime, account)["status"] == "current"
    relay(engine, fake_am.url)
    sent = fake_am.entitlements(account)
    assert len(sent) == 2
    assert sent[-1].body["entitlements"] == {"products": {"prod_reports": "full"}, "plan_changes": True}
