"""subs_account and subs_customer belong to other teams (DESIGN sections 2 and 11): they create accounts
with the contract columns alone and change or delete their rows as they see fit. This product's tables
must never block those writes, and what is left on our side must end in clear outcomes (a 404, a
stuck row in a visible state), never a crash loop."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from app.recompute.service import AccountNotFound, run_recompute
from tests.conftest import Accounts, post_event, service_headers
from tests.stripe_events import event, unique


def _count(engine, sql: str, account: str) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(sql, {"a": account}).scalar_one())


def test_the_owner_deletes_an_account_this_product_keeps_dunning_state_for(client, accounts: Accounts, runtime,
                                                                            engine):
    account, customer = accounts.create()
    assert post_event(client, event("invoice.payment_failed", id=unique("in"), customer=customer)).status_code == 200
    assert run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED", datetime.now(UTC)).outcome == "changed"
    outbox_rows = _count(engine, "SELECT count(*) FROM outbox WHERE account_id = %(a)s", account)
    assert outbox_rows > 0

    # Account Management deletes its rows: our subs_dunning row referenced subs_account (a foreign key
    # without ON DELETE), so the owner's DELETE failed with a foreign key violation.
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM subs_customer WHERE account_id = %(a)s", {"a": account})
        conn.exec_driver_sql("DELETE FROM subs_account WHERE account_id = %(a)s", {"a": account})

    # Our history is not deleted with it (no cascade), and what is left ends clearly.
    assert _count(engine, "SELECT count(*) FROM subs_dunning WHERE account_id = %(a)s", account) == 1
    assert _count(engine, "SELECT count(*) FROM outbox WHERE account_id = %(a)s", account) == outbox_rows
    with pytest.raises(AccountNotFound):
        run_recompute(engine, runtime.policy, account, "NINJAPANEL_BUTTON", datetime.now(UTC))
    response = client.get(f"/accounts/{account}/dunning", headers=service_headers())
    assert response.status_code == 404 and response.json["error"] == "not_found"


def test_the_owner_renames_an_account_this_product_keeps_dunning_state_for(accounts: Accounts, runtime, engine):
    account = unique("acct")
    with engine.begin() as conn:  # an account with no customer yet: the contract columns alone
        conn.exec_driver_sql("INSERT INTO subs_account (account_id) VALUES (%(a)s)", {"a": account})
    first = run_recompute(engine, runtime.policy, account, "NINJAPANEL_BUTTON", datetime.now(UTC))
    assert first.decision is not None and first.decision.state.status == "current"
    assert _count(engine, "SELECT count(*) FROM subs_dunning WHERE account_id = %(a)s", account) == 1

    renamed = unique("acct")
    with engine.begin() as conn:  # the owner's key update: blocked by our foreign key before
        conn.exec_driver_sql("UPDATE subs_account SET account_id = %(n)s WHERE account_id = %(a)s",
                             {"n": renamed, "a": account})
    second = run_recompute(engine, runtime.policy, renamed, "NINJAPANEL_BUTTON", datetime.now(UTC))
    assert second.decision is not None and second.decision.state.status == "current"


def _bad_debt(engine, account: str) -> tuple[str | None, bool]:
    with engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT d.status, a.bad_debt FROM subs_account a "
                                   "LEFT JOIN subs_dunning d USING (account_id) WHERE a.account_id = %(a)s",
                                   {"a": account}).one()
    return row[0], bool(row[1])


def test_a_customer_the_owner_unmaps_and_maps_again_elsewhere_recomputes_its_accounts(client, accounts: Accounts,
                                                                                     runtime, engine):
    """The owner deletes a customer's mapping (the account stays): the refile recomputes the account
    that had its invoices, which then leaves the bad debt of invoices it no longer owns. Before, only a
    customer still mapped (a move) was seen: the account kept its bad debt, subs_account.bad_debt and
    withheld entitlements until the sweep's rollout reached it. The same customer id mapped again,
    to another account, recomputes that account too."""
    from app.sweep.refile import refile_customers

    account, customer = accounts.create()
    invoice = unique("in")
    assert post_event(client, event("invoice.marked_uncollectible", id=invoice, customer=customer,
                                    amount_remaining=5000, amount_due=5000)).status_code == 200
    run_recompute(engine, runtime.policy, account, "MARKED_UNCOLLECTIBLE", datetime.now(UTC))
    assert _bad_debt(engine, account) == ("bad_debt", True)

    with engine.begin() as conn:  # Account Management removes the customer from the account
        conn.exec_driver_sql("DELETE FROM subs_customer WHERE stripe_customer_id = %(c)s", {"c": customer})
    done = refile_customers(engine)
    assert [a for a, _ in done.requested] == [account]
    run_recompute(engine, runtime.policy, account, "STATE_REFRESH", datetime.now(UTC))
    assert _bad_debt(engine, account) == ("current", False)
    assert refile_customers(engine).requested == []  # once

    other, _ = accounts.create()
    with engine.begin() as conn:  # the customer id mapped again, to another account
        conn.exec_driver_sql("INSERT INTO subs_customer (stripe_customer_id, account_id) VALUES (%(c)s, %(a)s)",
                             {"c": customer, "a": other})
    done = refile_customers(engine)
    assert [a for a, _ in done.requested] == [other]
    run_recompute(engine, runtime.policy, other, "STATE_REFRESH", datetime.now(UTC))
    assert _bad_debt(engine, other) == ("bad_debt", True)
    assert _bad_debt(engine, account) == ("current", False)
    assert refile_customers(engine).requested == []

    with engine.begin() as conn:  # the owner deletes that account with its customer rows
        conn.exec_driver_sql("DELETE FROM subs_customer WHERE account_id = %(a)s", {"a": other})
        conn.exec_driver_sql("DELETE FROM subs_account WHERE account_id = %(a)s", {"a": other})
    done = refile_customers(engine)  # filed under no account; no recompute of an account that is gone
    assert done.filed == 2 and done.requested == []  # its two customers


def test_no_constraint_or_trigger_of_this_product_holds_the_shared_tables(engine, clean):
    """After every migration: no foreign key from this product's tables to the shared ones (the owner's
    DELETE or key update would fail, or cascade into our history), and no trigger of ours on them
    (it would run in the owner's transactions)."""
    with engine.connect() as conn:
        references = conn.exec_driver_sql(
            "SELECT conrelid::regclass::text, conname FROM pg_constraint "
            "WHERE contype = 'f' AND confrelid IN ('subs_account'::regclass, 'subs_customer'::regclass) "
            "AND conrelid NOT IN ('subs_account'::regclass, 'subs_customer'::regclass)").fetchall()
        triggers = conn.exec_driver_sql(
            "SELECT tgrelid::regclass::text, tgname FROM pg_trigger "
            "WHERE tgrelid IN ('subs_account'::regclass, 'subs_customer'::regclass) AND NOT tgisinternal").fetchall()
    assert references == [] and triggers == []
