"""An older failure learned late is still a failed payment: PaymentFailed is emitted for it once.

Invoice A is declined (expired_card: permanent, the customer must act), then invoice B a day later.
A's webhooks are delivered after B's failure was already announced (Stripe redelivers for days after
an outage; deliveries come in no set order). Delivery order must not change what the customer is
told: A's PaymentFailed{permanent} is emitted when A is learned, B's is not emitted again, and a
recompute after it, or the events delivered again, emit nothing. A failure whose invoice was paid
since (its failure long announced, no longer part of the debt) is not announced again when its
old events are delivered again."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from app.recompute.service import run_recompute
from tests.conftest import Accounts, post_event
from tests.integration.test_journeys_journeys import charge_failed, invoice_event
from tests.integration.test_order_independence import payment_failures
from tests.stripe_events import unique

DAY = 86400


def _intent(evt: dict) -> str:
    return str(evt["data"]["object"]["payment_intent"])


def test_an_older_failure_learned_after_a_newer_one_was_announced_is_announced_once(client, accounts: Accounts,
                                                                                   engine, runtime):
    account, customer = accounts.create()
    t = int(time.time()) - 3 * DAY
    a, b = unique("in"), unique("in")
    a_events = [invoice_event("invoice.payment_failed", customer, a, t),
                charge_failed(customer, t + 1, "expired_card")]
    b_events = [invoice_event("invoice.payment_failed", customer, b, t + DAY, amount=2500, product="prod_other"),
                charge_failed(customer, t + DAY + 1, "insufficient_funds")]
    now = datetime.fromtimestamp(t + DAY + 600, UTC)

    for evt in b_events:
        assert post_event(client, evt).status_code == 200
    assert run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED", now).outcome == "changed"
    assert payment_failures(engine, account) == [(_intent(b_events[1]), "transient")]

    for evt in a_events:  # A's webhooks, late
        assert post_event(client, evt).status_code == 200
    assert run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED", now).outcome == "changed"
    assert payment_failures(engine, account) == [(_intent(b_events[1]), "transient"),
                                                 (_intent(a_events[1]), "permanent")]

    # Never twice: a recompute right after, and every event delivered again.
    assert run_recompute(engine, runtime.policy, account, "STATE_REFRESH", now).outcome == "unchanged"
    for evt in (*a_events, *b_events):
        assert post_event(client, evt).status_code == 200
    assert run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED", now).outcome == "unchanged"
    assert len(payment_failures(engine, account)) == 2


def test_the_same_failures_in_either_order_are_each_announced_once(client, accounts: Accounts, engine, runtime):
    t = int(time.time()) - 3 * DAY
    announced = []
    for first in ("a", "b"):
        account, customer = accounts.create()
        a, b = unique("in"), unique("in")
        events = {"a": [invoice_event("invoice.payment_failed", customer, a, t),
                        charge_failed(customer, t + 1, "expired_card")],
                  "b": [invoice_event("invoice.payment_failed", customer, b, t + DAY, amount=2500,
                                      product="prod_other"),
                        charge_failed(customer, t + DAY + 1, "incorrect_cvc")]}
        for name in (first, "b" if first == "a" else "a"):
            for evt in events[name]:
                assert post_event(client, evt).status_code == 200
            run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED", datetime.fromtimestamp(t + DAY + 600, UTC))
        intents = {_intent(events[n][1]): n for n in events}
        announced.append(sorted((intents[attempt], cls) for attempt, cls in payment_failures(engine, account)))
    assert announced[0] == announced[1] == [("a", "permanent"), ("b", "action_required")]


def test_a_failure_paid_long_ago_is_not_announced_again_when_its_events_come_again(client, accounts: Accounts,
                                                                                   engine, runtime):
    account, customer = accounts.create()
    t = int(time.time()) - 10 * DAY
    a, b = unique("in"), unique("in")
    a_failed = [invoice_event("invoice.payment_failed", customer, a, t), charge_failed(customer, t + 1, "expired_card")]
    for evt in a_failed:
        assert post_event(client, evt).status_code == 200
    run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED", datetime.fromtimestamp(t + 600, UTC))
    assert post_event(client, invoice_event("invoice.paid", customer, a, t + DAY, paid=5000)).status_code == 200
    run_recompute(engine, runtime.policy, account, "STATE_REFRESH", datetime.fromtimestamp(t + DAY + 600, UTC))
    b_failed = [invoice_event("invoice.payment_failed", customer, b, t + 5 * DAY, amount=2500, product="prod_other"),
                charge_failed(customer, t + 5 * DAY + 1, "insufficient_funds")]
    for evt in b_failed:
        assert post_event(client, evt).status_code == 200
    now = datetime.fromtimestamp(t + 5 * DAY + 600, UTC)
    run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED", now)
    assert payment_failures(engine, account) == [(_intent(a_failed[1]), "permanent"),
                                                 (_intent(b_failed[1]), "transient")]

    for evt in a_failed:  # A's old events, redelivered
        assert post_event(client, evt).status_code == 200
    assert run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED", now).outcome == "unchanged"
    assert len(payment_failures(engine, account)) == 2


def _null_announced(engine, account: str) -> None:
    """The row as the migration dunning_announced_failures leaves a row stored before it: NULL."""
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE subs_dunning SET announced_failures = NULL WHERE account_id = %(a)s",
                             {"a": account})


def _announced_column(engine, account: str):
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT announced_failures FROM subs_dunning WHERE account_id = %(a)s",
                                    {"a": account}).scalar_one()


def test_a_row_stored_before_the_list_was_kept_announces_nothing_again(client, accounts: Accounts, engine, runtime):
    """Rows stored before announced_failures (NULL) kept the latest failure announced only: every
    failure not newer than it was announced, none again. A row of an account with no failure stored
    is nothing announced, the same as the empty list: not rewritten."""
    account, customer = accounts.create()
    t = int(time.time()) - 3 * DAY
    a, b = unique("in"), unique("in")
    events = [invoice_event("invoice.payment_failed", customer, a, t), charge_failed(customer, t + 1, "expired_card"),
              invoice_event("invoice.payment_failed", customer, b, t + DAY, amount=2500, product="prod_other"),
              charge_failed(customer, t + DAY + 1, "insufficient_funds")]
    for evt in events:
        assert post_event(client, evt).status_code == 200
    now = datetime.fromtimestamp(t + DAY + 600, UTC)
    run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED", now)
    announced = payment_failures(engine, account)
    assert [cls for _, cls in announced] == ["permanent", "transient"]
    kept = _announced_column(engine, account)
    assert [m.partition("@")[0] for m in kept] == [attempt for attempt, _ in announced]

    _null_announced(engine, account)
    written = run_recompute(engine, runtime.policy, account, "STATE_REFRESH", now)
    assert written.applied is not None and written.applied.events == []  # the list written, nothing announced
    assert payment_failures(engine, account) == announced and _announced_column(engine, account) == kept
    assert run_recompute(engine, runtime.policy, account, "STATE_REFRESH", now).outcome == "unchanged"

    current, _ = accounts.create()
    run_recompute(engine, runtime.policy, current, "STATE_REFRESH", now)
    _null_announced(engine, current)
    assert run_recompute(engine, runtime.policy, current, "STATE_REFRESH", now).outcome == "unchanged"
