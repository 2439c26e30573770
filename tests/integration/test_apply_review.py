"""Apply: the bad-debt episode row and the events of the same change say the same thing."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

from tests.conftest import Accounts, post_event
from tests.integration.bad_debt_setup import DAY, into_bad_debt
from tests.stripe_events import event, unique, with_product


def test_an_exit_records_the_same_duration_in_the_episode_and_in_bad_debt_exited(client, engine, runtime,
                                                                                  accounts: Accounts):
    """The event truncated the seconds in bad debt (int()) and the episode's SQL rounded them
    (::bigint): an exit 10.6 s after the entry was 10 s in BadDebtExited and 11 s in the episode."""
    from app.recompute.service import run_recompute

    debt = into_bad_debt(client, engine, runtime, accounts)
    with engine.connect() as conn:
        entered = conn.exec_driver_sql("SELECT entered_at FROM bad_debt_episode WHERE account_id = %(a)s",
                                       {"a": debt.account}).scalar_one()
    voided = event("invoice.voided", id=debt.invoice, customer=debt.customer)
    assert post_event(client, voided).status_code == 200
    run_recompute(engine, runtime.policy, debt.account, "STATE_REFRESH", entered + timedelta(seconds=10.6))

    with engine.connect() as conn:
        episode = conn.exec_driver_sql("SELECT exit_how, duration_seconds FROM bad_debt_episode "
                                       "WHERE account_id = %(a)s", {"a": debt.account}).one()
        exited = conn.exec_driver_sql("SELECT payload FROM outbox WHERE account_id = %(a)s "
                                      "AND event_type = 'BadDebtExited'", {"a": debt.account}).scalar_one()
    assert (exited["how"], exited["duration_seconds"]) == ("resolved", 10)
    assert tuple(episode) == (exited["how"], exited["duration_seconds"])


def test_entering_bad_debt_straight_into_lifting_opens_its_episode_and_announces_it(client, engine, runtime,
                                                                                     accounts: Accounts, stripe_fake):
    """An account can enter bad debt as lifting: a bad-debt payment of its earlier episode still in
    flight (its outcome unknown), the debts it paid settled otherwise meanwhile (voided), and a new
    invoice marked uncollectible. Apply opened an episode, and derive_events announced BadDebtEntered,
    only for a change into status bad_debt: past_due/current -> lifting did neither, and lifting ->
    bad_debt (the payment failed) is no entry either. The account was in bad debt with no
    BadDebtEntered and no open episode, so its CancellationRequested named an episode that does not
    exist and the relay superseded it ('no bad-debt episode is open'): the subscription was never
    cancelled."""
    from app.outbox.relay import superseded, wanted
    from tests.integration.bad_debt_setup import intent_event, key, pay, recompute

    debt = into_bad_debt(client, engine, runtime, accounts)
    stripe_fake.add_invoice(debt.invoice_object)
    stripe_fake.intent_outcome = "server_error"  # the outcome unknown: the payment stays in flight
    response = pay(client, {"account_id": debt.account, "amount": debt.amount}, key())
    assert response.status_code == 502 and response.json["state"] == "pending"
    assert recompute(engine, runtime, debt.account, "BAD_DEBT_PAID")["status"] == "lifting"
    assert post_event(client, event("invoice.voided", id=debt.invoice, customer=debt.customer)).status_code == 200
    assert recompute(engine, runtime, debt.account)["status"] == "current"  # the first episode ends

    t = int(time.time()) - 30 * DAY
    invoice = unique("in")
    uncollectible = with_product(event("invoice.marked_uncollectible", id=invoice, customer=debt.customer, created=t,
                                       amount_due=700, amount_remaining=700, amount_paid=0, total=700,
                                       paths={"created": t - DAY}), "prod_core", 700)
    assert post_event(client, uncollectible).status_code == 200
    entered = recompute(engine, runtime, debt.account)
    assert entered["status"] == "lifting", entered

    def open_episodes() -> list[Any]:
        with engine.connect() as conn:
            return list(conn.exec_driver_sql(
                "SELECT entered_at, reason, products FROM bad_debt_episode WHERE account_id = %(a)s "
                "AND exited_at IS NULL", {"a": debt.account}).all())

    [(entered_at, reason, products)] = open_episodes()
    assert (reason, products) == ("marked_uncollectible", ["prod_core"])
    announced = [p for t_, p in outbox(engine, debt.account) if t_ == "BadDebtEntered"]
    assert [p["dunning_version"] for p in announced] == [1, entered["version"]]
    assert (announced[-1]["reason"], announced[-1]["products"]) == ("marked_uncollectible", ["prod_core"])

    failed = intent_event("failed", debt, unique("pi"), response.json["payment_id"], decline="insufficient_funds")
    assert post_event(client, failed).status_code == 200
    assert recompute(engine, runtime, debt.account)["status"] == "bad_debt"
    assert open_episodes() == [(entered_at, reason, products)]  # the same episode goes on
    assert [t_ for t_, _ in outbox(engine, debt.account)].count("BadDebtEntered") == 2  # no second entry
    with engine.connect() as conn:
        cancel, created_at = conn.exec_driver_sql(
            "SELECT payload, created_at FROM outbox WHERE account_id = %(a)s AND event_type = "
            "'CancellationRequested' ORDER BY id DESC LIMIT 1", {"a": debt.account}).one()
    assert datetime.fromisoformat(cancel["episode"]) == entered_at
    assert superseded("CancellationRequested", cancel, created_at, wanted(engine, debt.account)) is None


def outbox(engine: Any, account: str) -> list[tuple[str, dict[str, Any]]]:
    with engine.connect() as conn:
        return [(r[0], r[1]) for r in conn.exec_driver_sql(
            "SELECT event_type, payload FROM outbox WHERE account_id = %(a)s ORDER BY id", {"a": account})]
