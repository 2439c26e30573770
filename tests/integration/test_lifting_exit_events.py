"""A bad debt left from lifting without being paid (DESIGN 5 and 9): the bad-debt payment is in
flight (status lifting) when the invoice is voided. The account leaves bad debt straight from
lifting: each exit event once, in order, 'resolved' (the debt was closed without the customer's
money), its duration from the episode's start; the exit counted once in the metrics; and the
recompute after it writes nothing (no UPDATE, no event, no version bump)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import Engine

from app.recompute.observe import observe
from app.recompute.service import run_recompute
from tests.conftest import Accounts, post_event
from tests.integration.bad_debt_setup import into_bad_debt, key, pay
from tests.integration.test_metrics import metrics, value
from tests.stripe_events import event


def _outbox(engine: Engine, account: str) -> list[tuple[str, dict[str, Any]]]:
    with engine.connect() as conn:
        return [(t, p) for t, p in conn.exec_driver_sql(
            "SELECT event_type, payload FROM outbox WHERE account_id = %(a)s ORDER BY id", {"a": account})]


def _row(engine: Engine, account: str) -> tuple[Any, ...]:
    """The state row's version, changed_at and xmin (a new one for every UPDATE, whatever it wrote)."""
    with engine.connect() as conn:
        return tuple(conn.exec_driver_sql("SELECT version, changed_at, xmin::text FROM subs_dunning "
                                          "WHERE account_id = %(a)s", {"a": account}).one())


def test_lifting_ended_by_a_void_exits_once_resolved_from_the_episodes_start(client, engine: Engine, runtime,
                                                                             accounts: Accounts, stripe_fake):
    debt = into_bad_debt(client, engine, runtime, accounts, product="prod_premium")
    with engine.connect() as conn:
        entered = conn.exec_driver_sql("SELECT entered_at FROM bad_debt_episode WHERE account_id = %(a)s",
                                       {"a": debt.account}).scalar_one()
    stripe_fake.add_invoice(debt.invoice_object)
    stripe_fake.intent_outcome = "server_error"  # the outcome unknown: the payment stays in flight
    response = pay(client, {"account_id": debt.account, "amount": debt.amount}, key())
    assert response.status_code == 502 and response.json["state"] == "pending"

    def step(at: Any) -> list[tuple[str, dict[str, Any]]]:
        seen = len(_outbox(engine, debt.account))
        result = run_recompute(engine, runtime.policy, debt.account, "STATE_REFRESH", at)
        observe(result)  # counted as the task counts its runs
        return [(t, {k: v for k, v in p.items() if k not in ("account_id", "dunning_version")})
                for t, p in _outbox(engine, debt.account)[seen:]]

    lifting_at = entered + timedelta(hours=1)
    assert [t for t, _ in step(lifting_at)] == ["BadDebtLifting"]
    assert post_event(client, event("invoice.voided", id=debt.invoice, customer=debt.customer)).status_code == 200

    before = metrics(client)
    exit_at = entered + timedelta(hours=3, seconds=7)
    assert step(exit_at) == [
        ("ConsequenceEased", {"from_level": "suspended", "to_level": "none"}),
        ("BadDebtExited", {"how": "resolved", "duration_seconds": 3 * 3600 + 7}),
        ("DunningResolved", {"how": "resolved"}),
        ("EntitlementsChanged", {"entitlements": {"plan_changes": True, "products": {}}})]
    with engine.connect() as conn:
        episode = conn.exec_driver_sql("SELECT exited_at, exit_how, duration_seconds, products FROM bad_debt_episode "
                                       "WHERE account_id = %(a)s", {"a": debt.account}).one()
    assert tuple(episode) == (exit_at, "resolved", 3 * 3600 + 7, ["prod_premium"])
    after = metrics(client)
    exits = {"how": "resolved", "product": "prod_premium"}
    assert value(after, "dunning_bad_debt_exits_total", **exits) == \
        value(before, "dunning_bad_debt_exits_total", **exits) + 1
    assert value(after, "dunning_bad_debt_duration_seconds_count") == \
        value(before, "dunning_bad_debt_duration_seconds_count") + 1

    stored = _row(engine, debt.account)
    assert step(exit_at + timedelta(minutes=5)) == []  # run again: nothing
    assert _row(engine, debt.account) == stored
    again = metrics(client)
    assert value(again, "dunning_bad_debt_exits_total", **exits) == \
        value(after, "dunning_bad_debt_exits_total", **exits)
    assert value(again, "dunning_bad_debt_duration_seconds_count") == \
        value(after, "dunning_bad_debt_duration_seconds_count")
