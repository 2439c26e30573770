"""A relay of an account that runs through resolves the account's stuck tasks.deliver_account_outbox
work: the relay delivers the account's rows whole, in order, from wherever they stand, so the run that
gave up (dead for an operator: a bug since fixed, a worker killed; or retrying after a database
outage) has nothing left to do. Only a re-drive of that very row resolved it: a dead row is never
re-driven by beat, so ops and the support page listed a relay failure as stuck work long after the
account's rows had gone to Account Management. Rows the relay still fails on show on the outbox
(GET /ops/outbox, last_error), not as stuck work."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import requests
from sqlalchemy import Engine

import app.outbox.relay as relay_module
import tasks.outbox  # noqa: F401  (registers the task on the test's Celery app)
from app.domain.events import EntitlementsChanged
from app.outbox.relay import deliver_account, relay
from tasks.failures import FailureKind, record_stuck
from tests.integration.test_outbox_relay import LATER, outbox, write_events

DELIVER = "tasks.deliver_account_outbox"
RECOMPUTE = "tasks.recompute_account"


def stuck(engine: Engine, account: str) -> dict[str, list[str]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT task_name, state FROM subs_stuck_events WHERE account_id = %(a)s "
                                    "ORDER BY id", {"a": account}).all()
    out: dict[str, list[str]] = {}
    for task, state in rows:
        out.setdefault(task, []).append(state)
    return out


def gave_up(engine: Engine, account: str) -> None:
    """The account's relay task given up as dead (a bug), and a killed run of it (one row per arguments,
    as tasks/killed.py writes it); and a recompute of the account given up, which is not the relay's."""
    args = {"account_id": account}
    assert record_stuck(engine, DELIVER, args, account, FailureKind.UNEXPECTED, "AttributeError: a bug", 4, "dead")
    assert record_stuck(engine, DELIVER, {"account_id": account, "n": 1}, account, FailureKind.KILLED,
                        "WorkerLostError: killed", 1, "dead", per_args=True)
    assert record_stuck(engine, RECOMPUTE, {"account_id": account, "trigger": "MANUAL", "cause": None}, account,
                        FailureKind.INVALID_DATA, "ValueError: an earlier run", 1, "dead")


@pytest.mark.parametrize("answer", ["taken", "503"])
def test_a_beat_pass_that_relays_the_account_resolves_its_stuck_relay_task(accounts, engine, fake_am, answer):
    relayed, untouched = accounts.create()[0], accounts.create()[0]
    gave_up(engine, relayed)
    gave_up(engine, untouched)  # no row to relay: the pass never works on it
    write_events(engine, relayed, 1, [EntitlementsChanged(entitlements={"products": {"prod_core": "full"}})])
    if answer == "503":
        fake_am.mode = "failing"  # the row's own failure: on the outbox row, retried by the relay

    report = relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)

    assert report.accounts == 1
    assert outbox(engine, relayed)[0]["state"] == ("delivered" if answer == "taken" else "pending")
    assert stuck(engine, relayed) == {DELIVER: ["resolved", "resolved"], RECOMPUTE: ["dead"]}
    assert stuck(engine, untouched) == {DELIVER: ["dead", "dead"], RECOMPUTE: ["dead"]}


def test_the_accounts_own_task_that_runs_through_resolves_its_stuck_row(accounts, engine, celery_app, fake_am):
    account, _ = accounts.create()
    gave_up(engine, account)
    write_events(engine, account, 1, [EntitlementsChanged(entitlements={"products": {"prod_core": "full"}})])

    result = celery_app.tasks[DELIVER].apply(args=[account]).get()  # not a re-drive of the row: a new run

    assert result["delivered"] == 1
    assert stuck(engine, account) == {DELIVER: ["resolved", "resolved"], RECOMPUTE: ["dead"]}


def test_a_relay_that_fails_on_the_account_or_never_gets_to_it_leaves_the_row(accounts, engine, fake_am,
                                                                           monkeypatch):
    poison, locked = accounts.create()[0], accounts.create()[0]
    for account in (poison, locked):
        gave_up(engine, account)
        write_events(engine, account, 1, [EntitlementsChanged(entitlements={"v": 1})])

    def broken(row_id, account_id, *args):
        raise AttributeError("still broken")

    with monkeypatch.context() as patched:
        patched.setattr(relay_module, "call_for", broken)
        report = relay(engine, fake_am.url, now=datetime.now(UTC) + LATER, limit=1)  # the poison account only
    assert report.failed == 1
    assert stuck(engine, poison)[DELIVER] == ["dead", "dead"]

    with relay_module.account_lock(engine, locked), requests.Session() as session:  # another relay holds it
        skipped = deliver_account(engine, session, fake_am.url, locked)
    assert skipped.skipped_locked == 1
    assert stuck(engine, locked)[DELIVER] == ["dead", "dead"]


@pytest.mark.parametrize("cut", ["backing_off", "deadline"])
def test_a_relay_cut_short_before_the_accounts_rows_leaves_the_row(accounts, engine, fake_am, cut):
    """A run that stopped before it went through the account's rows (its head row still backing off,
    the pass's deadline passed) did not do what the failed run left: the row that broke it may be the
    one not reached. Its stuck row stays."""
    account, _ = accounts.create()
    gave_up(engine, account)
    write_events(engine, account, 1, [EntitlementsChanged(entitlements={"v": 1})])
    now = datetime.now(UTC) + LATER
    with requests.Session() as session:
        if cut == "backing_off":
            report = deliver_account(engine, session, fake_am.url, account, now_fn=lambda: now - 2 * LATER)
        else:
            report = deliver_account(engine, session, fake_am.url, account, now_fn=lambda: now, deadline=0.0)
    assert (report.delivered, report.failed) == (0, 0)
    assert outbox(engine, account)[0]["state"] == "pending"
    assert stuck(engine, account)[DELIVER] == ["dead", "dead"]
