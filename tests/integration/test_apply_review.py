"""Apply: the bad-debt episode row and the events of the same change say the same thing."""

from __future__ import annotations

from datetime import timedelta

from tests.conftest import Accounts, post_event
from tests.integration.bad_debt_setup import into_bad_debt
from tests.stripe_events import event


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
