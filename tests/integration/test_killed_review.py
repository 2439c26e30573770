"""Tasks killed with their process (tasks/killed.py), beside the rest of the failure handling: the
dead row of a task that works on a payment, not an account, is filed under the payment's account,
as its own failure handling files it (tasks.failures.account_of)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from billiard.exceptions import WorkerLostError
from celery.signals import task_failure

import tasks.killed
import tasks.payments  # noqa: F401  (registers tasks.retry_payment)
from app.payments.retries import claim_due
from tasks.bad_debt import RECONCILE, SETTLE
from tests.fakes import fake_stripe as outcomes
from tests.integration.bad_debt_setup import key, pay
from tests.integration.dunning_setup import failed_invoice
from tests.integration.test_bad_debt_reconcile import backdate

LATER = timedelta(minutes=31)  # past the default 30-minute guard window


def rows(engine, task: str) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.exec_driver_sql(
            "SELECT account_id, task_args, error_class, state, attempts FROM subs_stuck_events WHERE task_name = %(t)s",
            {"t": task}).mappings()]


def test_a_killed_reconciliation_is_the_payments_accounts_and_a_later_check_that_succeeds_resolves_it(
        client, engine, runtime, debtor, stripe_fake, celery_app):
    """A check whose pool child died under it every time becomes a dead row. Filed under no account,
    support never saw it on the account's page, and beat's next check, which did the work, did not
    resolve it (it resolves the payment's rows under the account): dead for ever."""
    stripe_fake.intent_outcome = "server_error_after_charge"
    payment_id = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key()).json["payment_id"]
    backdate(engine, payment_id, LATER)
    task = celery_app.tasks[RECONCILE]
    task_failure.send(sender=task, task_id="t-lost", exception=WorkerLostError("Worker exited prematurely"),
                      args=[payment_id], kwargs={})
    [row] = [r for r in rows(engine, RECONCILE) if r["task_args"] == {"payment_id": payment_id}]
    assert (row["account_id"], row["error_class"], row["state"]) == (debtor.account, "killed", "dead")

    result = task.apply(args=[payment_id])  # beat's next check, sent afresh
    assert result.successful(), result.traceback
    assert [r["state"] for r in rows(engine, RECONCILE) if r["task_args"] == {"payment_id": payment_id}] \
        == ["resolved"]


def test_a_killed_payment_retry_is_filed_under_its_account(client, accounts, engine, worker, celery_app):
    """Support sees it on the account's page, beside the retry's other failures."""
    account, customer = accounts.create()
    failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    (retry_id,) = claim_due(engine, datetime.now(UTC))  # dispatched; its task is killed with its process
    task_failure.send(sender=celery_app.tasks["tasks.retry_payment"], task_id="t-lost-retry",
                      exception=WorkerLostError("Worker exited prematurely"), args=[retry_id], kwargs={})
    [row] = [r for r in rows(engine, "tasks.retry_payment") if r["task_args"] == {"retry_id": retry_id}]
    assert (row["account_id"], row["error_class"], row["state"]) == (account, "killed", "dead")


def test_a_recompute_killed_for_good_is_not_sent_again_every_minute(accounts, engine, celery_app):
    """A recompute whose process died under it every time (out of memory on the account) is dead
    stuck work, for an operator. The request it took was rolled back with it each time: left as it
    was, the stale-request re-drive sent it again every minute, each time killing a child per run
    (the first and each retry), for ever; as it passes over the request of a recompute given up as
    dead any other way. A later event for the account touches the request and sends it once more."""
    import tasks.recompute  # noqa: F401  (registers the task)
    from app.redrive import redrive
    from webhooks.store import request_recompute

    account, _ = accounts.create()
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO recompute_request (account_id, trigger, cause, requested_at) "
                             "VALUES (%(a)s, 'PAYMENT_FAILED', 'evt_1', now() - interval '2 minutes')", {"a": account})
    task_failure.send(sender=celery_app.tasks["tasks.recompute_account"], task_id="t-lost-recompute",
                      exception=WorkerLostError("Worker exited prematurely"), args=[account, "PAYMENT_FAILED", "evt_1"],
                      kwargs={"coalesced": True})
    [row] = [r for r in rows(engine, "tasks.recompute_account") if r["account_id"] == account]
    assert (row["error_class"], row["state"]) == ("killed", "dead")
    try:
        assert redrive(engine, celery_app, stale_after_seconds=0)["sent"] == 0
        with engine.begin() as conn:  # a later webhook for the account
            request_recompute(conn, account, "PAYMENT_FAILED", "evt_2")
        assert redrive(engine, celery_app, stale_after_seconds=0)["sent"] == 1
    finally:
        celery_app.control.purge()


def test_a_task_killed_at_its_hard_time_limit_is_recorded_once_with_its_attempts(accounts, engine, celery_app):
    """Celery 5.7 sends task_failure twice for one hard time limit, both in the worker's main
    process: from Request.on_failure, with the task's request context pushed (its retries), then
    from Request.on_timeout, with none (seen in a real worker's log: 'killed with its process'
    twice for one task id). The second overwrote the row's attempts with 1 and counted the failure
    again in dunning_task_failures_total."""
    from billiard.exceptions import TimeLimitExceeded
    from celery.app.task import Context
    from prometheus_client import REGISTRY

    import tasks.recompute  # noqa: F401  (registers the task)

    def dead_count() -> float:
        return REGISTRY.get_sample_value("dunning_task_failures_total", {
            "task": "tasks.recompute_account", "failure_class": "killed", "action": "dead"}) or 0.0

    account, _ = accounts.create()
    task = celery_app.tasks["tasks.recompute_account"]
    before = dead_count()
    exc, call = TimeLimitExceeded(117), {"args": [account, "MANUAL"], "kwargs": {"cause": "dunning recompute"}}
    task.request_stack.push(Context(id="t-limit-twice", retries=2))  # Request.on_failure
    try:
        task_failure.send(sender=task, task_id="t-limit-twice", exception=exc, **call)
    finally:
        task.request_stack.pop()
    task_failure.send(sender=task, task_id="t-limit-twice", exception=exc, **call)  # Request.on_timeout
    [row] = [r for r in rows(engine, "tasks.recompute_account") if r["account_id"] == account]
    assert (row["error_class"], row["state"], row["attempts"]) == ("killed", "dead", 3)
    assert dead_count() == before + 1


def test_a_killed_payment_retry_charged_by_a_later_run_is_resolved(client, accounts, engine, worker, celery_app,
                                                                    fake_stripe):
    """A retry whose pool child died under it every time is a dead row. Killed before it was claimed
    for charging, it stays dispatched, and the next dispatch sends it afresh (a new task, no retries of
    its own): that run charged the invoice and left the dead row as it was, listed on the support
    page and to ops as a payment retry given up, although it was charged. tasks.retry_payment
    resolved its rows only in a run that had retried itself; a later run with an outcome of its own
    did the work the killed one had to do, as a later reconciliation does (the test above)."""
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    task = celery_app.tasks["tasks.retry_payment"]
    task_failure.send(sender=task, task_id="t-lost-then-sent", exception=WorkerLostError("Worker exited prematurely"),
                      args=[retry_id], kwargs={})
    assert [r["state"] for r in rows(engine, "tasks.retry_payment") if r["task_args"] == {"retry_id": retry_id}] \
        == ["dead"]

    result = task.apply(args=[retry_id])  # the dispatch's send of the row still dispatched, a new task
    assert result.get()["outcome"] == "sent" and len(fake_stripe.pay_requests(invoice)) == 1
    assert [r["state"] for r in rows(engine, "tasks.retry_payment") if r["task_args"] == {"retry_id": retry_id}] \
        == ["resolved"]


def test_a_payment_retry_delivered_again_after_its_refusal_leaves_the_dead_row(client, accounts, engine, worker,
                                                                                celery_app, fake_stripe):
    """The refusal's dead row is for an operator (a revoked key). The same message delivered again
    (its worker killed after the refusal was recorded, before the ack) finds the retry done: that run
    did nothing, and the row stays dead."""
    account, customer = accounts.create()
    failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    fake_stripe.script(outcomes.invalid())
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    task = celery_app.tasks["tasks.retry_payment"]
    assert task.apply(args=[retry_id]).failed()
    assert task.apply(args=[retry_id]).get()["outcome"] == "done"
    assert [r["state"] for r in rows(engine, "tasks.retry_payment") if r["task_args"] == {"retry_id": retry_id}] \
        == ["dead"]


def test_a_killed_settlement_that_waited_its_turn_is_resolved_by_the_settlement_that_succeeds(
        client, engine, debtor, stripe_fake, celery_app):
    """A settlement that found another of its account running is sent again with how often it waited
    (``waited``), and a run of it killed for good is a dead row keeping those arguments by name. The
    beat sweep's settlement that settled the payment resolved only the rows named {"payment_id": id}
    exactly: that dead row stayed, listed as a settlement given up, for a payment settled."""
    from tests.integration.test_bad_debt_settle_review import charged_payment

    payment_id = charged_payment(client, debtor)
    task = celery_app.tasks[SETTLE]
    task_failure.send(sender=task, task_id="t-lost-waiting", exception=WorkerLostError("Worker exited prematurely"),
                      args=[payment_id], kwargs={"waited": 3})
    [row] = [r for r in rows(engine, SETTLE) if r["task_args"].get("payment_id") == payment_id]
    assert (row["task_args"], row["state"]) == ({"payment_id": payment_id, "waited": 3}, "dead")
    try:
        result = task.apply(args=[payment_id])  # a settlement sent afresh (the sweep passes over a dead row)
        assert result.get()["outcome"] == "settled", result.get()
    finally:
        celery_app.control.purge()
    assert [r["state"] for r in rows(engine, SETTLE) if r["task_args"].get("payment_id") == payment_id] \
        == ["resolved"]


def test_a_settlement_killed_for_good_after_waiting_its_turn_is_not_swept_again(client, engine, runtime, debtor,
                                                                                 celery_app):
    """A settlement killed for good is dead stuck work for an operator, which the settlement sweep
    passes over (a message that kills the child running it is not sent again every tick). The sweep
    knew only a dead row named {"payment_id": id} exactly: a run killed after it had waited its turn
    keeps {"payment_id", "waited"} and was swept again, to kill a child each time."""
    from app.payments.bad_debt_settle import unsettled
    from tests.integration.test_bad_debt_settle_review import charged_payment

    payment_id = charged_payment(client, debtor)
    assert payment_id in unsettled(runtime, older_than_seconds=0)
    task_failure.send(sender=celery_app.tasks[SETTLE], task_id="t-lost-waited",
                      exception=WorkerLostError("Worker exited prematurely"), args=[payment_id], kwargs={"waited": 2})
    assert [(r["task_args"], r["state"]) for r in rows(engine, SETTLE)
            if r["task_args"].get("payment_id") == payment_id] == [({"payment_id": payment_id, "waited": 2}, "dead")]
    assert payment_id not in unsettled(runtime, older_than_seconds=0)
