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
from app.domain.events import EntitlementsChanged, UpgradeRevertRequested
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


@pytest.mark.parametrize("path", ["task", "beat_pass"])
def test_a_relay_that_finds_the_head_row_held_for_a_payment_resolves_a_retrying_row_not_a_dead_one(
        accounts, engine, fake_am, path):
    """The account's relay task gave up on a database outage (retrying: beat re-drives it) and, in
    another run, as dead; since, its head row, a lifecycle request, waits for a bad-debt payment in
    flight, which may take days (a bank debit). A run that reaches that row and holds it went through
    all the failed run had to do up to it and worked: the database answers, the rows wait in order by
    design and go once the payment ends. Left retrying (f8f7bec: held counted as cut short), the row
    was re-driven every 5 minutes and listed as stuck work for as long as the payment ran, with
    nothing broken. A dead row may be the held row's own fault (its send is not reached while it is
    held): it stays for an operator."""
    from tests.integration.test_outbox_relay import requesting
    from tests.integration.test_outbox_stale_entitlements import pay_bad_debt

    account, _ = accounts.create()
    assert record_stuck(engine, DELIVER, {"account_id": account}, account, FailureKind.DATABASE_UNAVAILABLE,
                        "OperationalError: the database is down", 11, "retrying")
    assert record_stuck(engine, DELIVER, {"account_id": account, "n": 1}, account, FailureKind.KILLED,
                        "WorkerLostError: killed", 1, "dead", per_args=True)
    requesting(engine, account, "revert:in_up")
    write_events(engine, account, 1, [UpgradeRevertRequested(invoice_id="in_up", subscription_id="sub_1")])
    pay_bad_debt(engine, account)

    now = datetime.now(UTC) + LATER
    if path == "task":
        with requests.Session() as session:
            report = deliver_account(engine, session, fake_am.url, account, now_fn=lambda: now)
    else:
        report = relay(engine, fake_am.url, now=now)
    assert (report.delivered, report.failed, report.held) == (0, 0, 1)
    assert fake_am.for_account(account) == []
    assert stuck(engine, account)[DELIVER] == ["resolved", "dead"]


def test_a_redrive_of_the_row_whose_run_is_cut_short_leaves_it(accounts, engine, celery_app, fake_am):
    """An operator re-drives the dead row (or beat a retrying one) while the account's head row backs
    off (Account Management refused it a moment ago): the run goes through nothing, as f8f7bec has a
    cut-short run leave the account's stuck rows. But the re-drive's own success resolved its row
    all the same (tasks/stuck.py resolves a re-driven row whose task succeeds unless it says it is
    deferred), and the fault vanished from the stuck list with the row that breaks the relay not
    reached."""
    import tasks.stuck  # noqa: F401  (resolves a re-driven row when its task succeeds, as in the worker)
    from app.stuck_work import task_id_for

    account, _ = accounts.create()
    gave_up(engine, account)
    write_events(engine, account, 1, [EntitlementsChanged(entitlements={"v": 1})])
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE outbox SET next_attempt_at = now() + interval '1 hour' "
                             "WHERE account_id = %(a)s", {"a": account})
        dead = conn.exec_driver_sql("SELECT id FROM subs_stuck_events WHERE task_name = %(t)s AND account_id = %(a)s "
                                    "ORDER BY id LIMIT 1", {"t": DELIVER, "a": account}).scalar_one()

    result = celery_app.tasks[DELIVER].apply(args=[account], task_id=task_id_for(dead)).get()

    assert result["delivered"] == 0
    assert stuck(engine, account)[DELIVER] == ["dead", "dead"]


def test_an_operators_redrive_of_a_dead_row_that_finds_the_head_row_held_leaves_it(accounts, engine, celery_app,
                                                                                    fake_am):
    """The account's relay task given up as dead (a bug: it may be the head row's own fault, whose send
    is not reached while the row is held for a bad-debt payment in flight). An operator re-drives it:
    the re-drive sets the row retrying (app/stuck_work.ONE_SQL), and the run, finding the head row
    held, resolved the account's retrying rows (64f46c4), that one included: the dead row an operator
    was asked to look at vanished with its fault not reached. Only a row retrying on a failure that
    passes (the database) is over once a run holds the head row."""
    import tasks.stuck  # noqa: F401  (resolves a re-driven row when its task succeeds, as in the worker)
    from app.stuck_work import ONE_SQL, REDRIVE_EVERY_SECONDS, task_id_for
    from tests.integration.test_outbox_relay import requesting
    from tests.integration.test_outbox_stale_entitlements import pay_bad_debt

    account, _ = accounts.create()
    assert record_stuck(engine, DELIVER, {"account_id": account}, account, FailureKind.UNEXPECTED,
                        "AttributeError: a bug", 4, "dead")
    requesting(engine, account, "revert:in_up")
    write_events(engine, account, 1, [UpgradeRevertRequested(invoice_id="in_up", subscription_id="sub_1")])
    pay_bad_debt(engine, account)
    with engine.begin() as conn:
        dead = conn.exec_driver_sql("SELECT id FROM subs_stuck_events WHERE task_name = %(t)s AND account_id = %(a)s",
                                    {"t": DELIVER, "a": account}).scalar_one()
        assert conn.exec_driver_sql(ONE_SQL, {"id": dead, "every": REDRIVE_EVERY_SECONDS}).first() is not None

    result = celery_app.tasks[DELIVER].apply(args=[account], task_id=task_id_for(dead)).get()

    assert (result["delivered"], result["held"]) == (0, 1)
    assert fake_am.for_account(account) == []
    assert stuck(engine, account)[DELIVER] == ["retrying"]
