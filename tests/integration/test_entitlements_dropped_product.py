"""A product its subscription no longer carries (a plan downgraded, an add-on removed, a product moved
to another subscription) while the invoice that billed it is unpaid is not the customer's any more:
the entitlements sent whole to Account Management revoke it, as for a subscription that ended. It
was granted at the level's access (full at notice) only for as long as the invoice stayed unpaid,
and taken away once it was paid (a known subscription's items decide its products): not paying kept
the product. Through the signed webhooks, real recomputes and the outbox relay against the fake
Account Management."""

from __future__ import annotations

import time
from typing import Any

from app.outbox.relay import relay
from tests.conftest import post_event
from tests.integration.bad_debt_setup import recompute
from tests.integration.test_journeys_journeys import invoice_event
from tests.stripe_events import event, unique


def subscription(customer: str, sub: str, product: str, before: str | None, at: int) -> dict[str, Any]:
    evt = event("customer.subscription.updated", created=at, id=sub, customer=customer, status="active",
                paths={"items.data.0.price.product": product})
    previous: dict[str, Any] = {"metadata": {}}
    if before is not None:
        previous = {"items": {"object": "list", "data": [{"price": {"product": before}}]}}
    evt["data"]["previous_attributes"] = previous
    return evt


def renewal(kind: str, customer: str, sub: str, invoice: str, at: int, created: int) -> dict[str, Any]:
    evt = invoice_event(kind, customer, invoice, at, paid=5000 if kind == "invoice.paid" else 0,
                        product="prod_premium", created=created)
    evt["data"]["object"]["parent"]["subscription_details"]["subscription"] = sub
    return evt


def sent(engine: Any, fake_am: Any, account: str) -> dict[str, str]:
    relay(engine, fake_am.url)
    return dict(fake_am.entitlements(account)[-1].body["entitlements"]["products"])


def test_a_plan_downgraded_while_its_renewal_is_unpaid_is_revoked_not_granted(client, accounts, engine, runtime,
                                                                            fake_am):
    account, customer = accounts.create()
    sub, invoice, now = unique("sub"), unique("in"), int(time.time())
    assert post_event(client, subscription(customer, sub, "prod_premium", None, now - 7200)).status_code == 200
    assert post_event(client, renewal("invoice.payment_failed", customer, sub, invoice, now - 3000,
                                      created=now - 3600)).status_code == 200
    assert recompute(engine, runtime, account)["level"] == "notice"
    assert sent(engine, fake_am, account) == {"prod_premium": "full"}

    # The customer moves down to core, the premium renewal still unpaid.
    assert post_event(client, subscription(customer, sub, "prod_core", "prod_premium", now - 600)).status_code == 200
    assert recompute(engine, runtime, account)["level"] == "notice"
    assert sent(engine, fake_am, account) == {"prod_core": "full", "prod_premium": "revoked"}

    # Paid: the premium renewal no longer restricts anything, and premium is not theirs.
    assert post_event(client, renewal("invoice.paid", customer, sub, invoice, now - 60,
                                      created=now - 3600)).status_code == 200
    assert recompute(engine, runtime, account)["status"] == "current"
    assert sent(engine, fake_am, account) == {"prod_core": "full"}
