"""The sweep's set-based batch gather builds exactly the snapshots recompute's gather_many builds.

Accounts of every shape (generated with a fixed seed, direct inserts the way ingest, recompute and
the payment paths write them): several customers per account, attempts linked only through their
invoice, a customer state per customer, retries, bad-debt payments, mandates, stuck events and
episodes open and closed, stored rows with reasons / entitlements / actions, no stored row at all.
"""

from __future__ import annotations

import random
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg2.extras import Json
from sqlalchemy import Connection, Engine

from app.recompute.gather import gather_many
from app.recompute.gather_batch import gather_batch, gather_page
from app.sweep.refile import refile_customers
from tests.conftest import Accounts

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)


def insert(conn: Connection, table: str, **values: Any) -> None:
    columns = ", ".join(values)
    params = ", ".join(f"%({k})s" for k in values)
    conn.exec_driver_sql(f"INSERT INTO {table} ({columns}) VALUES ({params})",
                         {k: Json(v) if isinstance(v, list | dict) else v for k, v in values.items()})


def pick(key: str, choices: list[Any]) -> Any:
    """A choice fixed by ``key``, drawing nothing from the generator's rng (whose sequence the shapes
    asserted below depend on)."""
    return choices[zlib.crc32(key.encode()) % len(choices)]


def at(rng: random.Random) -> datetime:
    return NOW - timedelta(days=rng.randint(0, 60), seconds=rng.randint(0, 86_400), microseconds=rng.randint(0, 999))


def stripe_side(conn: Connection, rng: random.Random, n: int, customer: str) -> None:
    for k in range(rng.randint(0, 3)):
        invoice = f"in_{n}_{customer[-2:]}_{k}"
        status = rng.choice(["open", "paid", "void", "uncollectible", "draft"])
        remaining = rng.choice([0, 700, 5000])
        insert(conn, "stripe_invoice", id=invoice, stripe_customer_id=customer, subscription_id=f"sub_{n}",
               status=status, billing_reason=rng.choice(["subscription_cycle", "subscription_update", None]),
               total=5000, amount_due=5000, amount_paid=5000 - remaining, amount_remaining=remaining,
               credited_amount=rng.choice([0, 100]), attempt_count=rng.randint(0, 4),
               lines=[{"product": rng.choice(["prod_core", "prod_premium"]), "amount": 5000,
                       "item": rng.choice([None, "si_plan"])},
                      {"product": "prod_core", "amount": -100}][: rng.randint(0, 2)],
               created=at(rng), due_date=rng.choice([None, at(rng)]), first_failed_at=rng.choice([None, at(rng)]),
               last_failed_at=rng.choice([None, at(rng)]), paid_at=rng.choice([None, at(rng)]),
               voided_at=rng.choice([None, at(rng)]), marked_uncollectible_at=rng.choice([None, at(rng)]),
               source_created=1, source_rank=1, source_event_id="evt_x",
               lines_incomplete=pick(invoice, [None, False, True]))
        for j in range(rng.randint(0, 3)):
            linked = rng.random() < 0.3  # known only through the invoice (no customer on the attempt)
            insert(conn, "stripe_payment_attempt", id=f"pi_{invoice}_{j}",
                   stripe_customer_id=None if linked else customer, invoice_id=invoice, charge_id=f"ch_{invoice}_{j}",
                   payment_method_id=rng.choice([None, f"pm_{n}_a", f"pm_{n}_b"]),
                   status=rng.choice(["failed", "succeeded", "pending", "refunded"]), amount=5000,
                   amount_refunded=rng.choice([0, 5000]), decline_code=rng.choice([None, "insufficient_funds"]),
                   failure_code=rng.choice([None, "card_declined"]), advice_code=rng.choice([None, "try_again_later"]),
                   attempted_at=at(rng), failed_at=rng.choice([None, at(rng)]), source_created=1, source_rank=1)
    if rng.random() < 0.3:  # an attempt without invoice
        insert(conn, "stripe_payment_attempt", id=f"ch_{n}_{customer}", stripe_customer_id=customer, invoice_id=None,
               status="failed", amount=5000, attempted_at=at(rng), source_created=1, source_rank=1)
    for k in range(rng.randint(0, 2)):
        insert(conn, "stripe_payment_method", id=f"pm_{n}_{customer[-2:]}_{k}", stripe_customer_id=customer,
               type="card", attached=rng.random() < 0.8, card_brand="visa", card_last4="4242",
               exp_month=rng.randint(1, 12), exp_year=rng.choice([2025, 2027]), changed_at=at(rng),
               source_created=1, source_rank=1)
    if rng.random() < 0.6:
        insert(conn, "stripe_customer_state", stripe_customer_id=customer,
               default_payment_method_id=rng.choice([None, f"pm_{n}_{customer[-2:]}_0"]),
               changed_at=rng.choice([None, at(rng)]),
               source_created=rng.randint(1, 3), source_rank=0)
    for k in range(rng.randint(0, 2)):
        insert(conn, "stripe_subscription", id=f"sub_{n}_{customer[-2:]}_{k}", stripe_customer_id=customer,
               status=rng.choice(["active", "past_due", "canceled"]),
               products=rng.choice([[], ["prod_core"], ["prod_core", "prod_premium"]]), source_created=1,
               source_rank=1)


def account_side(conn: Connection, rng: random.Random, n: int, account: str) -> None:
    if rng.random() < 0.8:
        insert(conn, "subs_dunning", account_id=account, status=rng.choice(["current", "past_due", "bad_debt"]),
               level=rng.choice(["none", "notice", "suspended"]), failure_class=rng.choice([None, "transient"]),
               next_retry_at=rng.choice([None, at(rng)]), retry_invoice_id=rng.choice([None, f"in_{n}"]),
               retry_free=rng.random() < 0.2, retries_used=rng.randint(0, 3), outstanding_amount=rng.randint(0, 9000),
               unpaid_since=rng.choice([None, at(rng)]), last_failure_id=rng.choice([None, f"pi_{n}"]),
               reasons=rng.choice([[], [{"rule": "status.current", "detail": "nothing unpaid", "facts": {}}],
                                   [{"rule": "level.notice", "detail": "x", "facts": {"invoice": f"in_{n}"}}]]),
               entitlements=rng.choice([{}, {"products": {"prod_core": "full"}, "plan_changes": True}]),
               actions_requested=rng.choice([[], [f"cancel:sub_{n}"]]), policy_version="v1",
               version=rng.randint(1, 9), retry_payment_method_id=pick(account, [None, f"pm_{n}_a"]),
               next_review_at=pick(account + "r", [None, NOW + timedelta(days=3, microseconds=7)]),
               prior_settled_at=pick(account + "p", [None, NOW - timedelta(days=40, microseconds=11)]),
               announced_failures=pick(account + "f", [None, [], [f"pi_{n}@2026-11-02T10:00:00+00:00"]]))
    for k in range(rng.randint(0, 2)):
        # Mostly claimed by the account, on its first customer's invoices; some on its second's, some
        # claimed by another account (before another team moved the customer), some on no invoice.
        claimant = account if rng.random() < 0.5 else f"acct_gb_{rng.randrange(60):03d}"
        insert(conn, "payment_retry", account_id=claimant, invoice_id=f"in_{n}_{rng.choice(['00', '00', '01'])}_{k}",
               payment_method_id=f"pm_{n}_a",
               retry_number=k + 1, free=rng.random() < 0.3, idempotency_key=f"retry-{account}-{k}",
               scheduled_for=at(rng), state=rng.choice(["dispatched", "charging", "sent", "skipped", "failed"]),
               created_at=at(rng))
    for k in range(rng.randint(0, 2)):
        insert(conn, "bad_debt_payment", account_id=account, idempotency_key=f"bdp-{account}-{k}",
               request_fingerprint="f", amount=5000, state="pending" if k == 0 and rng.random() < 0.5 else "failed",
               failure_reason=rng.choice([None, "card_declined"]), created_at=at(rng), updated_at=at(rng),
               stripe_payment_intent_id=rng.choice([None, f"pi_{n}_{k}"]),
               # its first customer's invoice, and its second's, which another team may move away:
               # a pending one is then in flight for the account that owns that invoice now
               invoice_ids=[f"in_{n}_00_{k}", f"in_{n}_01_0"])
    for k in range(rng.randint(0, 2)):
        insert(conn, "subs_mandate", payment_method_id=f"pm_{n}_m{k}", account_id=account, type="card",
               status=rng.choice(["usable", "blocked"]), status_reason=rng.choice([None, "permanent decline"]),
               is_default=k == 0, card_brand="visa", card_last4="4242", exp_month=1, exp_year=2027)
    for _ in range(rng.randint(0, 3)):
        insert(conn, "subs_stuck_events", account_id=account, task_name="tasks.recompute", error_class="x", error="y",
               state=rng.choice(["retrying", "dead", "resolved"]))
    if rng.random() < 0.3:
        insert(conn, "bad_debt_episode", account_id=account, entered_at=at(rng) - timedelta(days=90),
               reason="retries_exhausted", exited_at=at(rng))
    if rng.random() < 0.3:
        insert(conn, "bad_debt_episode", account_id=account, entered_at=at(rng), reason="marked_uncollectible")


def varied_accounts(engine: Engine, accounts: Accounts, count: int = 60) -> list[str]:
    rng = random.Random(20260301)
    ids = []
    for n in range(count):
        account, customer = accounts.create(account_id=f"acct_gb_{n:03d}", customer=f"cus_gb_{n:03d}_00")
        ids.append(account)
        with engine.begin() as conn:
            if rng.random() < 0.2:
                conn.exec_driver_sql("UPDATE subs_account SET bad_debt = true WHERE account_id = %(a)s", {"a": account})
            customers = [customer]
            if rng.random() < 0.25:  # a second Stripe customer for the same account
                customers.append(f"cus_gb_{n:03d}_01")
                insert(conn, "subs_customer", stripe_customer_id=customers[1], account_id=account)
            for cus in customers:
                stripe_side(conn, rng, n, cus)
            account_side(conn, rng, n, account)
    with engine.begin() as conn:  # another team moves some second customers, their rows filed where they were
        for n in range(count):
            if rng.random() < 0.15:
                conn.exec_driver_sql("UPDATE subs_customer SET account_id = %(to)s WHERE stripe_customer_id = %(c)s",
                                     {"to": f"acct_gb_{rng.randrange(count):03d}", "c": f"cus_gb_{n:03d}_01"})
        stripe_side(conn, rng, count, "cus_gb_unmapped")  # no account: its invoices and their retries nobody's
        # One account's payment in flight covering a first invoice of every account (as if their
        # customers had all been moved away from it since): in flight for each of those accounts.
        conn.exec_driver_sql(
            "INSERT INTO bad_debt_payment (account_id, idempotency_key, request_fingerprint, amount, state, "
            "invoice_ids, created_at, updated_at) "
            "SELECT a.account_id, 'bdp-elsewhere', 'f', 5000, 'pending', "
            "       (SELECT jsonb_agg(id ORDER BY id) FROM stripe_invoice WHERE id LIKE 'in\\_%%\\_00\\_0'), "
            "       %(now)s, %(now)s FROM subs_account a "
            " WHERE a.account_id LIKE 'acct\\_gb\\_%%' AND NOT EXISTS (SELECT 1 FROM bad_debt_payment b "
            "       WHERE b.account_id = a.account_id AND b.state = 'pending') ORDER BY a.account_id LIMIT 1",
            {"now": NOW})
        insert(conn, "payment_retry", account_id=ids[0], invoice_id=f"in_{count}_ed_0", payment_method_id=None,
               retry_number=1, free=False, idempotency_key="retry-unmapped", scheduled_for=NOW, state="sent",
               created_at=NOW)
    return ids


def retries_claimed_elsewhere(engine: Engine) -> list[tuple[str, str]]:
    """(owner, invoice) of the retries an account other than their invoice's owner claimed."""
    with engine.connect() as conn:
        return [(r[0], r[1]) for r in conn.exec_driver_sql(
            "SELECT c.account_id, r.invoice_id FROM payment_retry r JOIN stripe_invoice i ON i.id = r.invoice_id "
            "JOIN subs_customer c USING (stripe_customer_id) WHERE c.account_id <> r.account_id")]


def test_gather_batch_builds_exactly_the_snapshots_of_gather_many(accounts: Accounts, engine: Engine):
    ids = varied_accounts(engine, accounts)
    with engine.connect() as conn:
        expected = gather_many(conn, ids)
        batch = gather_batch(conn, ids)
        subset = ids[5:40:3]  # not a contiguous range: rows of the accounts in between are dropped
        some = gather_batch(conn, subset)
        pages: dict[str, Any] = {}
        order: list[str] = []
        last = ""
        while True:
            page_ids, page = gather_page(conn, last, 7)
            order += page_ids
            pages.update(page)
            if len(page_ids) < 7:
                break
            last = page_ids[-1]
        assert gather_batch(conn, []) == {}
    assert len(expected) == len(ids)
    # the shapes the generator was meant to produce are there
    snapshots = [s for s, _ in expected.values()]
    # the subscription item of a line reaches the snapshot (entitlements pair a swap by it)
    assert any(ln.item == "si_plan" for s in snapshots for i in s.invoices for ln in i.lines)
    assert any(s.stored is None for s in snapshots) and any(s.stored and s.stored.reasons for s in snapshots)
    assert any(len(s.invoices) > 2 for s in snapshots) and any(s.open_episode_entered_at for s in snapshots)
    assert any(s.open_stuck_events > 1 for s in snapshots) and any(s.default_payment_method_id for s in snapshots)
    assert any(a.invoice_id and a.id.startswith("pi_") for s in snapshots for a in s.attempts)
    assert any(a.failed_at for s in snapshots for a in s.attempts)
    assert any(a.failed_at is None for s in snapshots for a in s.attempts)
    assert any(len(s.retries) > 1 for s in snapshots)
    # every stored column and mirror field reaches the snapshot, each value both ways
    assert {i.lines_incomplete for s in snapshots for i in s.invoices} == {True, False}
    assert {s.stored.next_review_at is None for s in snapshots if s.stored} == {True, False}
    assert {s.stored.prior_settled_at is None for s in snapshots if s.stored} == {True, False}
    assert {s.stored.announced_failures for s in snapshots if s.stored} >= {None, (), tuple(
        m for s in snapshots if s.stored for m in s.stored.announced_failures or ())[:1]}
    assert {s.stored.retry_payment_method_id is None for s in snapshots if s.stored} == {True, False}
    # retries follow their invoice: claimed by another account (a customer moved), read for its owner
    elsewhere = retries_claimed_elsewhere(engine)
    assert len({owner for owner, _ in elsewhere}) > 3, elsewhere
    assert all(any(r.invoice_id == invoice for r in expected[owner][0].retries) for owner, invoice in elsewhere)
    # a pending bad-debt payment of another account on an invoice the account owns now is read for it
    assert sum(1 for s in snapshots if any(len(p.invoice_ids) > 5 for p in s.payments_elsewhere)) > 5
    assert all(p.state == "pending" for s in snapshots for p in s.payments_elsewhere)
    assert not any(r.invoice_id.startswith("in_60_") for s in snapshots for r in s.retries)  # nobody's invoice
    # several customers: each one's invoices, methods and default say which customer they belong to
    assert any(len({i.stripe_customer_id for i in s.invoices}) > 1 for s in snapshots)
    assert any(len({m.stripe_customer_id for m in s.payment_methods}) > 1 for s in snapshots)
    assert any(len(s.customer_defaults) > 1 for s in snapshots)
    assert all(i.stripe_customer_id and m.stripe_customer_id for s in snapshots for i in s.invoices
               for m in s.payment_methods)
    assert all(s.default_payment_method_id == (s.customer_defaults[0].payment_method_id if s.customer_defaults
                                                else None) for s in snapshots)
    for account in ids:
        assert batch[account] == expected[account], account
    assert set(some) == set(subset) and all(some[a] == expected[a] for a in subset)
    assert order == sorted(ids) and pages == expected


def test_gather_batch_agrees_with_gather_many_however_the_mirror_is_filed(accounts: Accounts, engine: Engine):
    """Mirror rows are read by the account they are filed under only where mirror_customer agrees
    with subs_customer; customers filed late, moved to another account or never filed are read
    through their customer id. Refiling them changes nothing the gather returns."""
    rng = random.Random(20261121)
    ids = [accounts.create(account_id=f"acct_gf_{n}", customer=f"cus_gf_{n}")[0] for n in range(4)]
    with engine.begin() as conn:
        stripe_side(conn, rng, 900, "cus_gf_early")  # rows before any account maps the customer
        stripe_side(conn, rng, 901, "cus_gf_0")
    with engine.begin() as conn:
        insert(conn, "subs_customer", stripe_customer_id="cus_gf_early", account_id=ids[0])
        insert(conn, "subs_customer", stripe_customer_id="cus_gf_moved", account_id=ids[1])
        insert(conn, "subs_customer", stripe_customer_id="cus_gf_bare", account_id=ids[2])  # no mirror rows
    with engine.begin() as conn:
        for n in range(3):  # filed under ids[1] as they arrive ...
            insert(conn, "stripe_invoice", id=f"in_gf_moved_{n}", stripe_customer_id="cus_gf_moved", status="open",
                   total=900, amount_due=900, amount_remaining=900, created=at(rng), source_created=1,
                   source_rank=1, source_event_id="evt_gf")
        insert(conn, "stripe_subscription", id="sub_gf_moved", stripe_customer_id="cus_gf_moved", status="active",
               products=["prod_core"], source_created=1, source_rank=1)
        for n in range(2):  # retries ids[1] claimed: they follow their invoice
            insert(conn, "payment_retry", account_id=ids[1], invoice_id=f"in_gf_moved_{n}", payment_method_id="pm_gf",
                   retry_number=1, free=False, idempotency_key=f"retry-gf-{n}", scheduled_for=NOW, state="failed",
                   created_at=NOW)
    with engine.begin() as conn:  # ... then another team moves the customer to ids[3]
        conn.exec_driver_sql("UPDATE subs_customer SET account_id = %(a)s WHERE stripe_customer_id = 'cus_gf_moved'",
                             {"a": ids[3]})

    def filed() -> dict[str, Any]:
        with engine.connect() as conn:
            return dict(conn.exec_driver_sql(
                "SELECT stripe_customer_id, account_key FROM mirror_customer WHERE stripe_customer_id LIKE 'cus_gf_%%'"
            ).all())

    def both() -> tuple[Any, Any, Any]:
        with engine.connect() as conn:
            return gather_many(conn, ids), gather_batch(conn, ids), gather_page(conn, "acct_gf", 4)[1]

    assert filed() == {"cus_gf_early": None, "cus_gf_0": ids[0], "cus_gf_moved": ids[1]}
    expected, batch, page = both()
    assert len(expected[ids[3]][0].invoices) == 3 and len(expected[ids[0]][0].invoices) >= 1
    assert expected[ids[1]][0].invoices == () and expected[ids[1]][0].subscriptions == ()
    assert [r.invoice_id for r in expected[ids[3]][0].retries] == ["in_gf_moved_0", "in_gf_moved_1"]
    assert expected[ids[1]][0].retries == ()
    assert batch == expected and page == expected

    assert refile_customers(engine).filed >= 5  # early, moved, bare and the three default customers without rows
    assert refile_customers(engine).filed == 0
    assert {k: v for k, v in filed().items() if k in ("cus_gf_early", "cus_gf_moved", "cus_gf_bare")} == {
        "cus_gf_early": ids[0], "cus_gf_moved": ids[3], "cus_gf_bare": ids[2]}
    with engine.connect() as conn:
        keys = conn.exec_driver_sql("SELECT DISTINCT account_key FROM stripe_invoice "
                                    "WHERE stripe_customer_id = 'cus_gf_moved'").scalars().all()
    assert keys == [ids[3]]
    assert both() == (expected, expected, expected)
