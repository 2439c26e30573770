"""A recompute that succeeds resolves the account's stuck recompute work: every run is the full
re-evaluation, so the one that failed (retrying, or dead for an operator) has nothing left to do."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from app.recompute.service import run_recompute
from tasks.failures import FailureKind, record_stuck
from tests.conftest import SUPPORT_TOKEN, wait_for

RECOMPUTE = "tasks.recompute_account"
PAYMENT = "tasks.retry_payment"


def stuck_states(engine: Engine, account: str) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT task_name, state FROM subs_stuck_events WHERE account_id = %(a)s",
                                    {"a": account}).all()
    return {task: state for task, state in rows}


def give_up(engine: Engine, account: str, task: str, state: str) -> None:
    args = {"account_id": account, "trigger": "PAYMENT_FAILED", "cause": None}
    assert record_stuck(engine, task, args, account, FailureKind.INVALID_DATA, "ValueError: an earlier run", 1, state)


@pytest.mark.parametrize("state", ["dead", "retrying"])
def test_a_recompute_that_succeeds_resolves_the_accounts_stuck_recompute(engine, runtime, accounts, state):
    account, _ = accounts.create()
    give_up(engine, account, RECOMPUTE, state)
    give_up(engine, account, PAYMENT, "dead")  # another task's work: not a recompute's to resolve

    run_recompute(engine, runtime.policy, account, "MANUAL")

    assert stuck_states(engine, account) == {RECOMPUTE: "resolved", PAYMENT: "dead"}


@pytest.mark.worker
def test_the_support_button_clears_the_recompute_an_earlier_run_gave_up(client, engine, accounts, worker):
    """The support page listed the dead recompute as stuck work after Recompute had succeeded: only a
    retry of that same task resolved it."""
    account, _ = accounts.create()
    give_up(engine, account, RECOMPUTE, "dead")
    response = client.post(f"/support/accounts/{account}/recompute",
                           headers={"Authorization": f"Bearer {SUPPORT_TOKEN}"})
    assert response.status_code == 202
    wait_for(lambda: stuck_states(engine, account) == {RECOMPUTE: "resolved"}, message="stuck recompute resolved")
