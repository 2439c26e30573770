"""GET /accounts/<id>/dunning for an account no recompute has stored a state for yet."""

from __future__ import annotations

from datetime import UTC, datetime

from tests.conftest import Accounts, post_event, service_headers
from tests.stripe_events import event, unique


def test_an_account_with_no_stored_state_yet_answers_the_entitlements_its_first_recompute_stores(
        client, engine, runtime, accounts: Accounts):
    """No subs_dunning row is a current account with every product in full (the drift sweep takes it
    so and never writes one); the view answered "entitlements": {} (no product, no plan_changes), and
    the first recompute, which changes nothing else a caller reads, then answered the products."""
    from app.recompute.service import run_recompute

    account, customer = accounts.create()
    subscription = event("customer.subscription.updated", id=unique("sub"), customer=customer, status="active")
    assert post_event(client, subscription).status_code == 200  # its recompute is queued; no worker runs here
    [product] = [i["price"]["product"] for i in subscription["data"]["object"]["items"]["data"]]

    before = client.get(f"/accounts/{account}/dunning", headers=service_headers())
    assert before.status_code == 200 and before.json["version"] == 0  # nothing stored yet
    assert before.json["entitlements"] == {"products": {product: "full"}, "plan_changes": True}

    run_recompute(engine, runtime.policy, account, "STATE_REFRESH", datetime.now(UTC))
    after = client.get(f"/accounts/{account}/dunning", headers=service_headers()).json
    assert after["version"] == 1
    compared = ("status", "level", "failure_class", "next_retry_at", "retries_used", "bad_debt", "entitlements")
    assert {k: before.json[k] for k in compared} == {k: after[k] for k in compared}


def test_an_account_with_nothing_known_answers_full_entitlements_of_no_product(client, accounts: Accounts):
    account, _customer = accounts.create()
    view = client.get(f"/accounts/{account}/dunning", headers=service_headers()).json
    assert view["entitlements"] == {"products": {}, "plan_changes": True}
