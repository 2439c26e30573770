"""A Stripe customer that another team maps to another account (subs_customer, no event to us) takes
its invoices with it: beat's refile of the mirror recomputes both accounts. The old account kept
the dunning state of invoices it no longer owned until the drift sweep remediated it, which happens
only inside the rollout stage (never while it is off)."""

from __future__ import annotations

import threading

import pytest

from tests.conftest import wait_for
from tests.integration.dunning_setup import dunning_row, failed_invoice


@pytest.mark.worker
def test_a_customer_moved_to_another_account_recomputes_both(client, engine, accounts, celery_app, worker):
    old, customer = accounts.create()
    new, _ = accounts.create()
    failed_invoice(client, engine, old, customer, "insufficient_funds")
    assert dunning_row(engine, old)["status"] == "past_due"

    with engine.begin() as conn:  # Account Management moves the customer
        conn.exec_driver_sql("UPDATE subs_customer SET account_id = %(a)s WHERE stripe_customer_id = %(c)s",
                             {"a": new, "c": customer})
    result = celery_app.tasks["tasks.refile_mirror"].apply().get()
    assert result["recomputes"] == 2  # the old account and the new (the new one's own customer is filed too)

    wait_for(lambda: dunning_row(engine, new).get("status") == "past_due", message="the new account in dunning")
    wait_for(lambda: dunning_row(engine, old).get("status") == "current", message="the old account out of it")
    assert celery_app.tasks["tasks.refile_mirror"].apply().get() == {"filed": 0, "recomputes": 0}  # once


def test_a_refile_and_an_ingest_in_flight_do_not_deadlock(accounts, engine):
    """Ingest locks the account's request row, then (its mirror trigger) mirror_customer. The refile
    took mirror_customer first and then the moved accounts' request rows: each waited for the other
    until PostgreSQL's deadlock detector failed one. It now requests first, then locks the mirror."""
    from app.embedded import poll_until
    from app.sweep.refile import refile_customers
    from tests.integration.test_mirror_filing import invoice, keys, move, waiting_on_a_lock
    from webhooks.store import request_recompute

    old, customer = accounts.create()
    new, _ = accounts.create()
    with engine.begin() as conn:
        invoice(conn, "in_moved_a", customer)  # filed under the old account
    move(engine, customer, new)
    writer = engine.connect()  # an ingest transaction in flight, for an event of the old account
    writer.begin()
    request_recompute(writer, old, "PAYMENT_FAILED", "evt_moved")
    outcome: list[object] = []

    def refile() -> None:
        try:
            outcome.append(refile_customers(engine))
        except BaseException as exc:  # reported below
            outcome.append(exc)

    thread = threading.Thread(target=refile)
    thread.start()
    try:
        assert poll_until(lambda: waiting_on_a_lock(engine, "SET LOCAL enable_seqscan = off; EXECUTE "
                                                            "dunning_request_recompute"), timeout=10)
        invoice(writer, "in_moved_b", customer)  # the event's mirror row, after its request
    finally:
        writer.commit()
        writer.close()
        thread.join(timeout=10)
    assert len(outcome) == 1 and not isinstance(outcome[0], BaseException), outcome
    assert keys(engine, customer) == (new, [new])
