"""Drift sweep on the real database: finds exactly the corrupted accounts, remediates only inside the
rollout stage, keeps off payments in flight, never overlaps; the recompute guard window."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from freezegun import freeze_time
from psycopg2.extras import Json
from sqlalchemy import Engine

from app.domain.policy import Policy
from app.recompute.service import run_recompute
from app.sweep.lock import sweep_lock
from app.sweep.remediate import celery_enqueuer
from app.sweep.sweep import SweepBusy, Sweeper
from tests.conftest import Accounts, wait_for
from tests.stripe_events import unique


@pytest.fixture
def rollout_off(engine: Engine, clean: None) -> Iterator[None]:
    """rollout_state is one seeded row, not truncated by ``clean``: put it back to off."""
    def reset() -> None:
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE rollout_state SET stage = 'off', held = false, named_accounts = '[]', "
                                 "stage_entered_at = now(), last_gate_at = NULL, last_gate_action = NULL, "
                                 "last_gate_reason = NULL WHERE id = 1")
    reset()
    yield
    reset()


def set_stage(engine: Engine, stage: str, named: list[str] | None = None, entered: datetime | None = None) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE rollout_state SET stage = %(s)s, named_accounts = %(n)s, stage_entered_at = %(e)s WHERE id = 1",
            {"s": stage, "n": Json(named or []), "e": entered or datetime.now(UTC)})


def unpaid_invoice(engine: Engine, customer: str, failed_at: datetime, status: str = "open",
                   amount: int = 5000) -> str:
    """An invoice in the Stripe mirror, as ingest writes it."""
    invoice = unique("in")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            """INSERT INTO stripe_invoice (id, stripe_customer_id, subscription_id, status, billing_reason, total,
                   amount_due, amount_paid, amount_remaining, attempt_count, lines, created, first_failed_at,
                   last_failed_at, marked_uncollectible_at, source_created, source_rank, source_event_id)
               VALUES (%(id)s, %(cus)s, 'sub_1', %(status)s, 'subscription_cycle', %(amount)s, %(amount)s, 0,
                       %(amount)s, 1, %(lines)s, %(created)s, %(failed)s, %(failed)s, %(uncollectible)s, 1, 1,
                       'evt_x')""",
            {"id": invoice, "cus": customer, "status": status, "amount": amount,
             "lines": Json([{"product": "prod_core", "amount": amount}]), "created": failed_at - timedelta(hours=1),
             "failed": failed_at, "uncollectible": failed_at if status == "uncollectible" else None})
    return invoice


def dispatched_retry(engine: Engine, account: str, invoice: str, at: datetime) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO payment_retry (account_id, invoice_id, payment_method_id, retry_number, idempotency_key, "
            "scheduled_for, state, created_at, updated_at) VALUES (%(a)s, %(i)s, 'pm_1', 1, %(k)s, %(t)s, "
            "'dispatched', %(t)s, %(t)s)",
            {"a": account, "i": invoice, "k": unique("retry"), "t": at})


def settle(engine: Engine, policy: Policy, account: str, now: datetime) -> None:
    run_recompute(engine, policy, account, "MANUAL", now)


def sql(engine: Engine, statement: str, **params: Any) -> Any:
    with engine.begin() as conn:
        return conn.exec_driver_sql(statement, params).fetchall() if statement.lstrip().upper().startswith(
            "SELECT") else conn.exec_driver_sql(statement, params)


def parked_request(engine: Engine, account: str) -> None:
    """A recompute request parked by the account's recompute given up as dead (tasks.failures): the
    stale-request re-drive passes over it until something asks for the account anew."""
    sql(engine, "INSERT INTO recompute_request (account_id, trigger, cause) VALUES (%(a)s, 'PAYMENT_FAILED', 'evt')",
        a=account)
    sql(engine, "UPDATE recompute_request SET parked_touch = touched_at WHERE account_id = %(a)s", a=account)
    sql(engine, "INSERT INTO subs_stuck_events (task_name, account_id, task_args, error_class, error, attempts, "
                "state, last_failed_at) VALUES ('tasks.recompute_account', %(a)s, '{}', 'invalid_data', 'x', 1, "
                "'dead', now())", a=account)


def dunning(engine: Engine, account: str) -> Any:
    return sql(engine, "SELECT d.status, d.level, a.bad_debt FROM subs_account a LEFT JOIN subs_dunning d "
                       "USING (account_id) WHERE account_id = %(a)s", a=account)[0]


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int | None]] = []

    def __call__(self, account_id: str, run_id: int | None) -> str:
        self.sent.append((account_id, run_id))
        return f"task-{len(self.sent)}"


def refuse(account_id: str, run_id: int | None) -> str:
    raise AssertionError(f"nothing may be enqueued, got {account_id}")


@pytest.fixture
def corrupted(accounts: Accounts, runtime, engine: Engine, rollout_off: None) -> dict[str, str]:
    """Six settled accounts, three corrupted on purpose in different ways."""
    now = datetime.now(UTC)
    ids = {}
    for name in ("paid", "unpaid", "flagged", "ok_current", "ok_unpaid", "ok_other"):
        account, customer = accounts.create(account_id=unique(f"acct_{name}"))
        ids[name] = account
        if "unpaid" in name:
            unpaid_invoice(engine, customer, now - timedelta(days=8))
        settle(engine, runtime.policy, account, now)
    sql(engine, "UPDATE subs_dunning SET status = 'bad_debt' WHERE account_id = %(a)s", a=ids["paid"])
    sql(engine, "UPDATE subs_dunning SET level = 'suspended' WHERE account_id = %(a)s", a=ids["unpaid"])
    sql(engine, "UPDATE subs_account SET bad_debt = true WHERE account_id = %(a)s", a=ids["flagged"])
    return ids


def test_sweep_finds_exactly_the_corrupted_accounts_and_fixes_only_those_in_stage(
        runtime, engine: Engine, corrupted: dict[str, str], celery_app, worker):
    in_stage = [corrupted["paid"], corrupted["flagged"]]
    set_stage(engine, "named", in_stage)
    report = Sweeper(engine, runtime.policy, celery_enqueuer(celery_app)).start()

    assert (report.scanned, report.drifted, report.in_stage, report.guarded, report.enqueued, report.errors) == \
        (6, 3, 2, 0, 2, 0)
    assert report.finished and report.out_of_stage == 1
    found = {f["account_id"]: f for f in report.drifted_accounts}
    assert set(found) == {corrupted["paid"], corrupted["unpaid"], corrupted["flagged"]}
    assert found[corrupted["paid"]]["fields"] == ["status"]
    assert found[corrupted["paid"]]["stored"] == {"status": "bad_debt"}
    assert found[corrupted["unpaid"]]["fields"] == ["level"]
    assert found[corrupted["unpaid"]]["action"] == "out_of_stage"
    assert found[corrupted["flagged"]]["fields"] == ["bad_debt_flag"]

    records = {r.account_id: r for r in sql(engine, "SELECT account_id, remediated, skipped, stage, fields, sweep_id "
                                                    "FROM drift_record")}
    assert set(records) == set(found)
    assert records[corrupted["paid"]].remediated and records[corrupted["flagged"]].remediated
    assert not records[corrupted["unpaid"]].remediated
    assert records[corrupted["unpaid"]].skipped == "out_of_stage"
    assert {r.stage for r in records.values()} == {"named"}
    run = sql(engine, "SELECT id, state, scanned, drifted, in_stage, guarded, enqueued, errors, cursor "
                      "FROM sweep_run")[0]
    assert (run.state, run.scanned, run.drifted, run.in_stage, run.guarded, run.enqueued) == \
        ("finished", 6, 3, 2, 0, 2)
    assert {r.sweep_id for r in records.values()} == {run.id}

    # The real worker runs the DRIFT_DETECTED recomputes: in-stage drift repaired, the rest left alone.
    wait_for(lambda: dunning(engine, corrupted["paid"]).status == "current", message="paid account repaired")
    wait_for(lambda: dunning(engine, corrupted["flagged"]).bad_debt is False, message="flag repaired")
    assert sql(engine, "SELECT last_trigger FROM subs_dunning WHERE account_id = %(a)s",
               a=corrupted["paid"])[0].last_trigger == "DRIFT_DETECTED"
    assert dunning(engine, corrupted["unpaid"]).level == "suspended"

    # A second sweep finds only the out-of-stage account.
    again = Sweeper(engine, runtime.policy, refuse).start()
    assert again.drifted == 1 and again.enqueued == 0
    assert again.drifted_accounts[0]["account_id"] == corrupted["unpaid"]


def test_dry_run_writes_nothing_and_enqueues_nothing(runtime, engine: Engine, corrupted: dict[str, str]):
    set_stage(engine, "100")
    report = Sweeper(engine, runtime.policy, refuse, dry_run=True).start()
    assert (report.scanned, report.drifted, report.in_stage, report.enqueued) == (6, 3, 3, 0)
    assert report.run_id is None
    assert sql(engine, "SELECT count(*) FROM sweep_run")[0][0] == 0
    assert sql(engine, "SELECT count(*) FROM drift_record")[0][0] == 0
    assert sql(engine, "SELECT count(*) FROM recompute_request")[0][0] == 0
    assert dunning(engine, corrupted["paid"]).status == "bad_debt"  # untouched


def test_at_stage_off_drift_is_recorded_never_remediated(runtime, engine: Engine, corrupted: dict[str, str]):
    report = Sweeper(engine, runtime.policy, refuse).start()
    assert (report.drifted, report.in_stage, report.enqueued) == (3, 0, 0)
    skipped = sql(engine, "SELECT DISTINCT skipped, remediated FROM drift_record")
    assert [(s.skipped, s.remediated) for s in skipped] == [("out_of_stage", False)]


def test_a_sweep_never_overlaps_a_running_one(runtime, engine: Engine, corrupted: dict[str, str]):
    recorder = Recorder()
    with sweep_lock(engine):
        with pytest.raises(SweepBusy, match="another drift sweep"):
            Sweeper(engine, runtime.policy, recorder).start()
        with pytest.raises(SweepBusy):
            Sweeper(engine, runtime.policy, recorder, dry_run=True).start()
    assert sql(engine, "SELECT count(*) FROM sweep_run")[0][0] == 0

    # Between two chained segments the lock is free, but the running row (fresh heartbeat) holds.
    set_stage(engine, "100")
    first = Sweeper(engine, runtime.policy, recorder, batch_size=2).start(max_seconds=0)
    assert not first.finished and first.scanned == 2 and first.cursor
    assert first.run_id is not None
    with pytest.raises(SweepBusy, match=f"sweep {first.run_id} is still running"):
        Sweeper(engine, runtime.policy, recorder).start()
    rest = Sweeper(engine, runtime.policy, recorder, batch_size=2).resume(first.run_id)
    assert rest.finished and rest.scanned == 6 and rest.drifted == 3 and rest.enqueued == 3
    assert sorted(a for a, _ in recorder.sent) == sorted([corrupted["paid"], corrupted["unpaid"],
                                                          corrupted["flagged"]])
    assert sql(engine, "SELECT count(*) FROM drift_record")[0][0] == 3  # each account once
    assert sql(engine, "SELECT state, scanned FROM sweep_run")[0] == ("finished", 6)
    with pytest.raises(SweepBusy, match="not running"):
        Sweeper(engine, runtime.policy, recorder).resume(first.run_id)


def test_a_stale_running_sweep_is_abandoned(runtime, engine: Engine, corrupted: dict[str, str]):
    sql(engine, "INSERT INTO sweep_run (state, cursor, updated_at) VALUES ('running', 'x', now() - interval '1 hour')")
    report = Sweeper(engine, runtime.policy, Recorder()).start()
    assert report.finished
    states = [r.state for r in sql(engine, "SELECT state FROM sweep_run ORDER BY id")]
    assert states == ["abandoned", "finished"]


def test_failed_enqueue_counts_as_an_error_and_is_recorded(runtime, engine: Engine, corrupted: dict[str, str]):
    """A send failing otherwise than by the broker (which defers it: test_rollout_broker_refused_remediation.py)."""
    set_stage(engine, "100")

    def broken(account_id: str, run_id: int | None) -> str:
        raise TypeError("Object of type Decimal is not JSON serializable")

    report = Sweeper(engine, runtime.policy, broken).start()
    assert report.errors == 3 and report.enqueued == 0
    assert sql(engine, "SELECT errors FROM sweep_run")[0][0] == 3
    assert {r.skipped for r in sql(engine, "SELECT skipped FROM drift_record")} == {"error"}


# --- the payment-flow guard, on both sides of the 30-minute window ---------------------------------


def test_sweep_guard_keeps_off_a_retry_in_flight_until_the_window_passes(
        accounts: Accounts, runtime, engine: Engine, rollout_off: None):
    t0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    account, customer = accounts.create()
    invoice = unpaid_invoice(engine, customer, t0 - timedelta(days=8))
    settle(engine, runtime.policy, account, t0)
    dispatched_retry(engine, account, invoice, t0)
    sql(engine, "UPDATE subs_dunning SET status = 'bad_debt', level = 'suspended' WHERE account_id = %(a)s",
        a=account)
    set_stage(engine, "100")

    with freeze_time(t0 + timedelta(minutes=10)):
        recorder = Recorder()
        inside = Sweeper(engine, runtime.policy, recorder).start()
    assert (inside.drifted, inside.guarded, inside.in_stage, inside.enqueued) == (1, 1, 0, 0)
    assert recorder.sent == []
    assert sql(engine, "SELECT skipped FROM drift_record")[0][0] == "guarded:retry_in_flight"

    with freeze_time(t0 + timedelta(minutes=31)):
        recorder = Recorder()
        after = Sweeper(engine, runtime.policy, recorder).start()
    assert (after.drifted, after.guarded, after.in_stage, after.enqueued) == (1, 0, 1, 1)
    assert [a for a, _ in recorder.sent] == [account]


def test_sweep_never_touches_an_account_in_lifting(accounts: Accounts, runtime, engine: Engine, rollout_off: None):
    account, _ = accounts.create()
    settle(engine, runtime.policy, account, datetime.now(UTC))
    sql(engine, "UPDATE subs_dunning SET status = 'lifting' WHERE account_id = %(a)s", a=account)
    set_stage(engine, "100")
    report = Sweeper(engine, runtime.policy, refuse).start()
    assert (report.drifted, report.guarded, report.enqueued) == (1, 1, 0)
    assert report.drifted_accounts[0]["action"] == "guarded:lifting"


@pytest.mark.parametrize("minutes, status", [(10, "past_due"), (29, "past_due"), (31, "bad_debt")])
def test_recompute_guard_holds_bad_debt_while_a_retry_is_in_flight(
        accounts: Accounts, runtime, engine: Engine, clean: None, minutes: int, status: str):
    t0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    account, customer = accounts.create()
    # Marked uncollectible: the suspended rule matches; only the guard can keep it out of bad debt.
    invoice = unpaid_invoice(engine, customer, t0 - timedelta(days=30), status="uncollectible")
    dispatched_retry(engine, account, invoice, t0)
    with freeze_time(t0 + timedelta(minutes=minutes)):
        result = run_recompute(engine, runtime.policy, account, "MANUAL", datetime.now(UTC))
    assert result.decision is not None
    assert result.decision.state.status == status
    guarded = any(r.rule == "guard.payment_in_flight" for r in result.decision.state.reasons)
    assert guarded is (status != "bad_debt")
    assert dunning(engine, account).bad_debt is (status == "bad_debt")


# --- the sweep's batch read sees exactly what recompute's gather sees ------------------------------


def test_batch_read_pages_by_keyset_with_the_same_snapshots_as_gather_many(accounts: Accounts, runtime,
                                                                            engine: Engine, rollout_off: None):
    from app.recompute.gather import gather_many
    from app.sweep.batch_read import read_batch

    now = datetime.now(UTC)
    ids = []
    for n in range(7):
        account, customer = accounts.create(account_id=f"acct_br_{n}")
        ids.append(account)
        if n % 2:
            invoice = unpaid_invoice(engine, customer, now - timedelta(days=n + 1))
            dispatched_retry(engine, account, invoice, now)
        if n % 3 == 0:
            settle(engine, runtime.policy, account, now)
    with engine.connect() as conn:
        expected = gather_many(conn, ids)
        first_ids, first = read_batch(conn, "", 4)
        rest_ids, rest = read_batch(conn, first_ids[-1], 4)
        assert read_batch(conn, rest_ids[-1], 4) == ([], {})
    assert first_ids + rest_ids == sorted(ids)
    assert {**first, **rest} == expected


def test_beat_tasks_sweep_and_check_the_gate_on_the_real_worker(runtime, engine: Engine, corrupted: dict[str, str],
                                                                  celery_app, worker):
    set_stage(engine, "named", [corrupted["flagged"]])
    swept = celery_app.send_task("tasks.drift_sweep").get(timeout=30)
    assert (swept["scanned"], swept["drifted"], swept["enqueued"], swept["finished"]) == (6, 3, 1, True)
    wait_for(lambda: dunning(engine, corrupted["flagged"]).bad_debt is False, message="flag repaired by the worker")
    # a second sweep while one holds the lock exits at once, saying so
    with sweep_lock(engine):
        busy = celery_app.send_task("tasks.drift_sweep").get(timeout=30)
    assert "another drift sweep" in busy["skipped"]
    gate = celery_app.send_task("tasks.check_rollout_gate").get(timeout=30)
    assert gate["action"] == "hold" and gate["stage"] == "named" and gate["health"]["remediations"] == 1
    assert gate["stuck_in_lifting"] == 0
    # customers without mirror rows get filed under their accounts, once
    assert celery_app.send_task("tasks.refile_mirror").get(timeout=30)["filed"] >= 1
    assert celery_app.send_task("tasks.refile_mirror").get(timeout=30) == {"filed": 0, "recomputes": 0}
