"""Two subscriptions of one customer renew together and both charges are declined: their webhooks
come in one burst, and one recompute (the requests coalesced) first sees both failures. Each is a
failed payment: one PaymentFailed per attempt, each with its own class, oldest first, and none
again when the events are redelivered."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from app.recompute.service import run_recompute
from tests.conftest import Accounts, post_event
from tests.integration.test_journeys_journeys import charge_failed, invoice_event
from tests.integration.test_order_independence import payment_failures
from tests.stripe_events import unique

DAY = 86400


def test_two_renewals_declined_together_are_each_announced_once(client, accounts: Accounts, engine, runtime):
    account, customer = accounts.create()
    t = int(time.time()) - 2 * DAY
    core, other = unique("in"), unique("in")
    deliveries = [invoice_event("invoice.payment_failed", customer, core, t),
                  charge_failed(customer, t + 1, "insufficient_funds"),
                  invoice_event("invoice.payment_failed", customer, other, t + 120, amount=2500,
                                product="prod_other"),
                  charge_failed(customer, t + 121, "expired_card")]
    for evt in deliveries:
        assert post_event(client, evt).status_code == 200
    first = run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED", datetime.fromtimestamp(t + 600, UTC))
    assert first.outcome == "changed"
    intents = [evt["data"]["object"]["payment_intent"] for evt in deliveries[1::2]]
    assert payment_failures(engine, account) == [(intents[0], "transient"), (intents[1], "permanent")]

    for evt in deliveries:  # Stripe redelivers (the same event ids)
        assert post_event(client, evt).status_code == 200
    again = run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED", datetime.fromtimestamp(t + 900, UTC))
    assert again.outcome == "unchanged"
    assert len(payment_failures(engine, account)) == 2
