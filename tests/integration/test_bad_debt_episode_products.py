"""A bad-debt episode's products are every product in bad debt during it, not only the entry's.

The account enters bad debt for prod_premium (its invoice marked uncollectible); while it is in bad
debt, a second invoice, for prod_core, is marked uncollectible too. The episode row kept the entry's
products only, so its exit (BadDebtExited, dunning_bad_debt_exits_total{how, product}, the bad-debt
report) counted prod_premium alone, as if prod_core had never been in bad debt. BadDebtEntered
keeps the products as they were at entry (an event is a past fact); the product that joins counts
as an entry of its own (dunning_bad_debt_entries_total, under the episode's reason), once."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from app.reports.bad_debt import lines
from tests.conftest import Accounts, post_event
from tests.integration.bad_debt_setup import DAY, into_bad_debt, recompute
from tests.integration.test_metrics import metrics, value
from tests.stripe_events import event, unique, with_product


def _episodes(engine, account: str) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(
            "SELECT reason, products, exit_how FROM bad_debt_episode WHERE account_id = %(a)s ORDER BY id",
            {"a": account})]


def _events(engine, account: str, kind: str) -> list[dict]:
    with engine.connect() as conn:
        return [p for (p,) in conn.exec_driver_sql(
            "SELECT payload FROM outbox WHERE account_id = %(a)s AND event_type = %(k)s ORDER BY id",
            {"a": account, "k": kind})]


def test_a_product_joining_bad_debt_mid_episode_is_one_of_the_episodes_products(client, engine, runtime,
                                                                                accounts: Accounts):
    start = metrics(client)
    debt = into_bad_debt(client, engine, runtime, accounts, product="prod_premium")
    assert _episodes(engine, debt.account) == [("marked_uncollectible", ["prod_premium"], None)]

    t = int(time.time()) - 2 * DAY
    core = unique("in")
    joined = with_product(event("invoice.marked_uncollectible", id=core, customer=debt.customer, created=t,
                                amount_due=700, amount_remaining=700, amount_paid=0, total=700,
                                paths={"created": t - DAY}), "prod_core", 700)
    assert post_event(client, joined).status_code == 200
    before_join = metrics(client)
    assert recompute(engine, runtime, debt.account)["status"] == "bad_debt"
    after_join = metrics(client)
    assert _episodes(engine, debt.account) == [("marked_uncollectible", ["prod_core", "prod_premium"], None)]
    assert [p["products"] for p in _events(engine, debt.account, "BadDebtEntered")] == [["prod_premium"]]
    entries = "dunning_bad_debt_entries_total"
    for product, more in (("prod_core", 1), ("prod_premium", 0)):
        assert value(after_join, entries, reason="marked_uncollectible", product=product) == \
            value(before_join, entries, reason="marked_uncollectible", product=product) + more, product
    # run again: nothing to write, nothing counted again
    assert recompute(engine, runtime, debt.account)["status"] == "bad_debt"
    assert value(metrics(client), entries, reason="marked_uncollectible", product="prod_core") == \
        value(after_join, entries, reason="marked_uncollectible", product="prod_core")

    for invoice, product, amount in ((debt.invoice, "prod_premium", debt.amount), (core, "prod_core", 700)):
        voided = with_product(event("invoice.voided", id=invoice, customer=debt.customer, amount_due=amount,
                                    amount_remaining=amount, amount_paid=0, total=amount), product, amount)
        assert post_event(client, voided).status_code == 200
    assert recompute(engine, runtime, debt.account)["status"] == "current"
    closed = metrics(client)
    assert _episodes(engine, debt.account) == [("marked_uncollectible", ["prod_core", "prod_premium"], "resolved")]
    assert [p["how"] for p in _events(engine, debt.account, "BadDebtExited")] == ["resolved"]
    exits = "dunning_bad_debt_exits_total"
    for product in ("prod_core", "prod_premium"):
        assert value(closed, exits, how="resolved", product=product) == \
            value(start, exits, how="resolved", product=product) + 1, product

    with engine.connect() as conn:
        report = lines(conn, datetime.fromtimestamp(time.time() - DAY, UTC))
    assert {(ln.event, ln.product) for ln in report} >= {("exit", "prod_core"), ("exit", "prod_premium")}
