"""Task failure handling found by review (DESIGN section 8): a Stripe rate limit's Retry-After is
honoured by every task that calls Stripe, a task whose give-up cannot be written down (the database
is what failed) is kept rather than dropped, and every retry has jitter, the first one too."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, Task
from celery.exceptions import Retry
from flask.testing import FlaskClient

from tasks.factory import make_celery
from tasks.failures import MAX_COUNTDOWN, PASSING, POLICIES, RETRY_AFTER_SPREAD, FailureKind
from tests.conftest import post_event
from tests.fakes.fake_stripe_payments import FakeStripePayments
from tests.integration.bad_debt_setup import InBadDebt, intent_event, key, pay


def run_as_worker(task: Task, args: list[Any], retries: int = 0) -> Any:
    """Run the task's body as the worker would, its retries ``retries`` so far. A retry raises
    Celery's Retry (its countdown in ``when``) without publishing: the request is eager."""
    task.push_request(id=f"review-{task.name}-{retries}", args=args, kwargs={}, retries=retries,
                      called_directly=False, is_eager=True)
    try:
        return task.run(*args)
    finally:
        task.pop_request()


def charged_payment(client: FlaskClient, debtor: InBadDebt) -> int:
    """A bad-debt payment whose success webhook came in: ready to settle."""
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    evt = intent_event("succeeded", debtor, response.json["stripe_payment_intent_id"], response.json["payment_id"])
    assert post_event(client, evt).status_code == 200
    return int(response.json["payment_id"])


@pytest.fixture
def retry_after_30(stripe_fake: FakeStripePayments, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stripe's 429 answers carry ``Retry-After: 30``, as Stripe may send (stripe-python reads it)."""
    serve = stripe_fake._server._handle

    def with_retry_after(*request: Any) -> Any:
        status, headers, payload = serve(*request)  # type: ignore[misc]
        return status, ({**headers, "Retry-After": "30"} if status == 429 else headers), payload

    monkeypatch.setattr(stripe_fake._server, "_handle", with_retry_after)


def test_a_rate_limited_settlement_waits_for_retry_after(client, celery_app, debtor, stripe_fake, retry_after_30):
    """The bad-debt settlement rate limited by Stripe: retried when Stripe said (30 s, spread over the
    next fifth of it), not after the 2 s of the class's own backoff, which would only be limited
    again and spend its retries."""
    import tasks.bad_debt  # noqa: F401  (registers the task)

    payment_id = charged_payment(client, debtor)
    stripe_fake.pay_outcome = "rate_limited"
    with pytest.raises(Retry) as retried:
        run_as_worker(celery_app.tasks["tasks.settle_bad_debt_payment"], [payment_id])
    assert 30 <= retried.value.when <= 30 * RETRY_AFTER_SPREAD
    assert any(c.path.endswith("/pay") for c in stripe_fake.calls)  # it was Stripe that limited it


@pytest.fixture
def database_down_app(settings) -> Iterator[Celery]:
    """The worker's Celery app with a database that refuses connections (nothing listens on port 1)."""
    yield make_celery(dataclasses.replace(settings, database_url="postgresql+psycopg2://postgres@127.0.0.1:1/dunning"))


def test_a_recompute_giving_up_while_the_database_is_down_is_kept_not_dropped(database_down_app):
    """A database outage longer than the task's own backoff: its give-up cannot be written to
    subs_stuck_events (the database is what failed). Raising would have Celery acknowledge the
    message (a task that raises is acked, late ack or not) with nothing left to show or re-drive it:
    a support button's recompute, which has no request row, was lost. It waits for the database
    instead, at the longest countdown."""
    import tasks.recompute  # noqa: F401  (registers the task)

    task = database_down_app.tasks["tasks.recompute_account"]
    give_up = POLICIES[FailureKind.DATABASE_UNAVAILABLE].max_retries
    with pytest.raises(Retry) as kept:
        run_as_worker(task, ["acct-support", "NINJAPANEL_BUTTON", "support:ana"], retries=give_up)
    assert kept.value.when == MAX_COUNTDOWN


def test_the_first_retry_has_jitter_too():
    """Tasks failing together (a database failover, a broker restart) must not retry together: each
    class's countdown is drawn at random from its first retry on, not a fixed base for the first."""
    for kind in PASSING:
        policy = POLICIES[kind]
        first = {policy.countdown(0) for _ in range(50)}
        assert len(first) > 1, kind
        assert all(policy.base <= c <= policy.cap for c in first), kind


# The beat tasks that had no failure handling of their own: a failure failed the tick (acknowledged,
# never retried), counted nowhere and written nowhere, whatever its class.
UNHANDLED_BEAT_TASKS = ("tasks.redrive_requests", "tasks.settle_unsettled_bad_debt_payments",
                        "tasks.reconcile_bad_debt_payments", "tasks.check_rollout_gate", "tasks.refile_mirror",
                        # the database down as the drift sweep takes its lock: no sweep for 15 minutes, seen nowhere
                        "tasks.drift_sweep")


def failures_counted(task: str, kind: FailureKind, action: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("dunning_task_failures_total",
                                     {"task": task, "failure_class": kind.value, "action": action}) or 0.0


@pytest.mark.parametrize("task_name", UNHANDLED_BEAT_TASKS)
def test_a_beat_tick_the_database_fails_retries_with_its_class_backoff_and_is_counted(database_down_app, task_name):
    """DESIGN 8: a database outage retries with its class's backoff and jitter, and every failure
    counts in dunning_task_failures_total. These ticks raised the driver's error: the message was
    acknowledged with no retry, and the outage was in no metric (a tick failing for ever, the
    re-drive of lost recomputes or the rollout gate's, showed nowhere but the worker log)."""
    database_down_app.loader.import_default_modules()  # the worker's task modules, as a worker imports them
    kind = FailureKind.DATABASE_UNAVAILABLE
    before = failures_counted(task_name, kind, "retry")
    with pytest.raises(Retry) as retried:
        run_as_worker(database_down_app.tasks[task_name], [])
    assert POLICIES[kind].base <= retried.value.when <= POLICIES[kind].base * 2
    assert failures_counted(task_name, kind, "retry") == before + 1


@pytest.mark.worker
def test_a_refile_held_by_a_lock_retries_and_its_give_up_is_stuck_work_its_next_tick_resolves(
        celery_app, engine, locking, accounts, worker):
    """tasks.refile_mirror locks mirror_customer (SHARE ROW EXCLUSIVE), which every mirror write holds
    (ROW EXCLUSIVE): under a webhook burst it waits past lock_timeout. It failed for good each time,
    and the customers moved stayed unfiled, their accounts not recomputed, with nothing to show it.
    Lock contention now retries with its own short backoff; once its retries are over the tick is a
    retrying stuck row (no account, no arguments), which its next tick that succeeds resolves."""
    from app.dispatch import send
    from tests.conftest import wait_for
    from tests.integration.test_beat_task_resolves_stuck import states

    celery_app.loader.import_default_modules()
    accounts.create()  # a customer never filed: a candidate
    task = celery_app.tasks["tasks.refile_mirror"]
    kind = FailureKind.LOCK_CONTENTION
    with locking.connect() as writer:  # a mirror write in flight
        writer.exec_driver_sql("BEGIN; LOCK TABLE mirror_customer IN ROW EXCLUSIVE MODE")
        with pytest.raises(Retry) as retried:
            run_as_worker(task, [])
        assert retried.value.when <= POLICIES[kind].cap
        with pytest.raises(Exception, match="lock timeout"):
            run_as_worker(task, [], retries=POLICIES[kind].max_retries)
        writer.exec_driver_sql("ROLLBACK")
    assert states(engine, "tasks.refile_mirror") == ["retrying"]
    send(celery_app, "tasks.refile_mirror")  # beat's next tick, on the real broker and worker
    wait_for(lambda: states(engine, "tasks.refile_mirror") == ["resolved"], message="the tick's row resolved")


def test_every_beat_tick_expires_so_its_retries_do_not_pile_up():
    """A beat task retries by failure class; one that cannot record its give-up (the database is down)
    keeps retrying at the longest countdown. Its next ticks do the same work, so a tick that has not
    run by then is dropped (Celery keeps a message's expiry on its retries) rather than joined by a
    new retrying tick every period for as long as the outage lasts."""
    from tasks.schedule import BEAT_SCHEDULE

    assert [name for name, entry in BEAT_SCHEDULE.items() if not entry.get("options", {}).get("expires")] == []
