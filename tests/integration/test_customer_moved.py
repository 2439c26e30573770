"""A Stripe customer that another team maps to another account (subs_customer, no event to us) takes
its invoices with it: beat's refile of the mirror recomputes both accounts. The old account kept
the dunning state of invoices it no longer owned until the drift sweep remediated it, which happens
only inside the rollout stage (never while it is off)."""

from __future__ import annotations

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
