"""A merchant's pause of payment collection with ``behavior = mark_uncollectible`` (Stripe's grace
period: the subscription stays active, the service on, and each new invoice is finalized and marked
uncollectible at once, never attempted) is no debt: no bad debt, no cancellation, the invoice
labelled Resolved. A genuinely uncollectible invoice (attempted and failed, or marked outside such a
pause) is bad debt as before, and the order the subscription's and the invoice's events come in does
not change which. Through the signed webhooks and real recomputes."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest

from tests.conftest import post_event
from tests.integration.bad_debt_setup import dunning_row, recompute
from tests.integration.journey_views import dunning, labels, outbox
from tests.integration.test_journeys_journeys import invoice_event
from tests.stripe_events import event, resource, unique

DAY = 86400
# The fixture subscription's own pause: {"behavior": "mark_uncollectible", "resumes_at": null}.
PAUSED = resource("subscription")["pause_collection"]


def subscription_event(customer: str, sub: str, at: int, pause: Any) -> dict[str, Any]:
    """customer.subscription.updated of an active subscription of prod_premium, its collection paused
    as ``pause`` says (None: not paused)."""
    evt = event("customer.subscription.updated", created=at, id=sub, customer=customer, status="active",
                pause_collection=pause, paths={"items.data.0.price.product": "prod_premium"})
    evt["data"]["previous_attributes"] = {"pause_collection": None if pause else PAUSED}
    return evt


def marked(customer: str, invoice: str, sub: str, at: int, *, attempts: int = 0,
           created: int | None = None) -> dict[str, Any]:
    """invoice.marked_uncollectible of the subscription's invoice created at ``created`` (``at``)."""
    evt = invoice_event("invoice.marked_uncollectible", customer, invoice, at, product="prod_premium",
                        attempts=attempts, created=at if created is None else created)
    evt["data"]["object"]["parent"]["subscription_details"]["subscription"] = sub
    return evt


def finalized(customer: str, invoice: str, sub: str, at: int) -> dict[str, Any]:
    evt = invoice_event("invoice.finalized", customer, invoice, at, attempts=0, product="prod_premium", created=at)
    evt["data"]["object"]["parent"]["subscription_details"]["subscription"] = sub
    return evt


def post(client: Any, *events: dict[str, Any]) -> None:
    for evt in events:
        assert post_event(client, evt).status_code == 200


def test_an_invoice_marked_uncollectible_by_a_paused_collection_is_no_debt(client, accounts, engine, runtime):
    account, customer = accounts.create()
    sub, invoice, t0 = unique("sub"), unique("in"), int(time.time()) - 30 * DAY
    post(client, subscription_event(customer, sub, t0, PAUSED),
         finalized(customer, invoice, sub, t0 + DAY), marked(customer, invoice, sub, t0 + DAY))
    summary = recompute(engine, runtime, account)
    assert summary["status"] == "current" and summary["level"] == "none", summary
    assert "invoice.collection_paused" in [r["rule"] for r in summary["reasons"]], summary["reasons"]
    state = dunning(client, account)
    assert state["bad_debt"] is False and state["outstanding_amount"] == 0, state
    assert state["entitlements"]["products"] == {"prod_premium": "full"}, state
    events = outbox(engine, account)
    assert "BadDebtEntered" not in events and "CancellationRequested" not in events, events
    assert labels(client, account)[invoice] == "Resolved"
    # A recompute right after changes nothing.
    assert recompute(engine, runtime, account)["changed_fields"] == []


@pytest.mark.parametrize("case", ["not_paused", "attempted", "created_before_the_pause", "pause_ended"])
def test_a_genuinely_uncollectible_invoice_is_still_bad_debt(client, accounts, engine, runtime, case):
    """Marked outside a mark_uncollectible pause (collection not paused, the invoice created before
    the pause began or after it ended), or attempted and failed during one: bad debt, the
    subscription cancelled, as before."""
    account, customer = accounts.create()
    sub, invoice, t0 = unique("sub"), unique("in"), int(time.time()) - 30 * DAY
    history = [subscription_event(customer, sub, t0, None if case == "not_paused" else PAUSED)]
    if case == "pause_ended":
        history.append(subscription_event(customer, sub, t0 + DAY, None))
    if case == "attempted":
        history.append(invoice_event("invoice.payment_failed", customer, invoice, t0 + 2 * DAY, attempts=1,
                                     product="prod_premium", created=t0 + 2 * DAY))
    created = t0 - DAY if case == "created_before_the_pause" else t0 + 2 * DAY
    history.append(marked(customer, invoice, sub, t0 + 2 * DAY, attempts=1 if case == "attempted" else 0,
                          created=created))
    post(client, *history)
    summary = recompute(engine, runtime, account)
    assert summary["status"] == "bad_debt", summary
    assert dunning_row(engine, account)["actions_requested"] == [f"cancel:{sub}"]
    assert labels(client, account)[invoice] == "Uncollectible"


@pytest.mark.parametrize("forgiven", [True, False], ids=["paused_then", "resumed_before"])
def test_the_order_of_the_subscription_and_invoice_events_does_not_change_the_outcome(
        client, accounts, engine, runtime, forgiven):
    """The pause set, the invoice marked, the pause lifted: in every order of delivery, recomputed
    after each, the invoice made during the pause is forgiven. Lifted before the invoice was made:
    bad debt in every order."""
    t0 = int(time.time()) - 30 * DAY
    invoice_at = t0 + DAY if forgiven else t0 + 3 * DAY
    outcomes = set()
    for order in itertools.permutations(range(3)):
        account, customer = accounts.create()
        sub, invoice = unique("sub"), unique("in")
        history = [subscription_event(customer, sub, t0, PAUSED),
                   marked(customer, invoice, sub, invoice_at),
                   subscription_event(customer, sub, t0 + 2 * DAY, None)]
        for n in order:
            post(client, history[n])
            recompute(engine, runtime, account)
        final = recompute(engine, runtime, account)
        assert final["changed_fields"] == [], (order, final)
        state, actions = dunning(client, account), dunning_row(engine, account)["actions_requested"]
        outcomes.add((state["status"], state["bad_debt"], tuple(a.replace(sub, "sub") for a in actions),
                      labels(client, account)[invoice]))
    expected = ("current", False, (), "Resolved") if forgiven else ("bad_debt", True, ("cancel:sub",), "Uncollectible")
    assert outcomes == {expected}
