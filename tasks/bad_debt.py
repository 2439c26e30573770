"""The bad-debt payment's tasks: settling it after its PaymentIntent succeeded, and asking Stripe
about one whose outcome never arrived; with their beat sweeps."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import stripe
from celery import Task, shared_task

from app import metrics
from app.dispatch import BrokerUnavailable, enqueue_recompute, send
from app.domain.triggers import Trigger
from app.payments.bad_debt_reconcile import NotReconciled, due, reconcile
from app.payments.bad_debt_settle import ACCOUNT, OVERPAID_TASK, NotSettled, settle, unsettled
from app.payments.bad_debt_webhook import DISPUTED_TASK, REFUNDED_AFTER_SETTLEMENT_TASK, enqueue_settlement
from app.payments.stripe_client import KEY_REFUSED, NO_KEY
from app.stuck_work import DEFERRED, stuck_id_of, task_id_for
from tasks.failures import FailureKind, TaskFailure, account_of, resolve_stuck, retry_after_seconds
from tasks.recompute import handle_failure
from tasks.runtime import runtime_for

log = logging.getLogger(__name__)

SETTLE = "tasks.settle_bad_debt_payment"
RECONCILE = "tasks.reconcile_bad_debt_payment"
OVERPAID = OVERPAID_TASK
REFUNDED_AFTER_SETTLEMENT = REFUNDED_AFTER_SETTLEMENT_TASK
DISPUTED = DISPUTED_TASK
BUSY_COUNTDOWN, BUSY_RETRIES = 5, 24


def _as_failure(exc: Exception) -> Exception:
    """Stripe's errors by failure class; anything else is classified by tasks.failures."""
    if isinstance(exc, stripe.RateLimitError):  # retried when Stripe says, if it says
        return TaskFailure(FailureKind.RATE_LIMITED, "Stripe rate limit", retry_after=retry_after_seconds(exc.headers))
    if isinstance(exc, stripe.APIConnectionError | stripe.APIError):
        return TaskFailure(FailureKind.REMOTE_UNAVAILABLE, f"Stripe unavailable: {exc.__class__.__name__} "
                           f"{exc.http_status or ''}".strip())
    if isinstance(exc, KEY_REFUSED):
        # Our key, rolled or revoked (or lacking a permission): no fault of the payment's, and it
        # passes once a working key is configured. Dead stuck work would keep the settlement sweep
        # off the customer's charged payment until an operator re-drove it. Not retried within the
        # run (the worker's key stays the one refused): a retrying row that names it, for beat.
        return TaskFailure(FailureKind.CREDENTIALS_REFUSED, f"Stripe refused our API key: {exc.__class__.__name__} "
                           f"{exc.http_status or ''}".strip())
    if isinstance(exc, stripe.StripeError | NotSettled | NotReconciled):
        return TaskFailure(FailureKind.PERMANENT_API_ERROR, f"{exc.__class__.__name__}: {exc}")
    return exc


def _not_sent(task: str, payment_id: int) -> dict[str, Any]:
    """Without STRIPE_API_KEY (make run's default) nothing is asked of Stripe: with an empty key
    api.stripe.com answers 401, which failed the task for good (a dead stuck row, which the
    settlement sweep then passes over even once a key is set). Nothing is changed: the payment
    stays pending, for the beat sweeps once a key is set. Deferred: a re-driven stuck row stays."""
    what = "settled" if task == SETTLE else "reconciled with Stripe"
    log.warning("bad-debt payment %s not %s: %s", payment_id, what, NO_KEY)
    return {"payment_id": payment_id, "outcome": "not_sent", "detail": NO_KEY, DEFERRED: True}


def _recompute(app: Any, account_id: str, payment_id: int) -> None:
    """The account's recompute after its payment moved (the request row is committed)."""
    try:
        enqueue_recompute(app, account_id, Trigger.BAD_DEBT_PAID.value, f"bad_debt_payment:{payment_id}")
    except BrokerUnavailable as exc:  # the committed recompute request is re-driven by beat
        log.warning("recompute after bad-debt payment %s moved not queued: %s", payment_id, exc)


def _send_each(app: Any, task: str, payment_ids: list[int]) -> int:
    """One task per payment, until the broker fails (beat comes back for the rest): how many sent."""
    sent = 0
    for payment_id in payment_ids:
        try:
            send(app, task, [payment_id], ignore_result=True)
        except BrokerUnavailable:
            break
        sent += 1
    return sent


@shared_task(name=SETTLE, bind=True)
def settle_bad_debt_payment(self: Task, payment_id: int, waited: int = 0) -> dict[str, Any]:
    rt = runtime_for(self.app)
    args = {"payment_id": int(payment_id)}
    if not rt.settings.stripe_api_key:
        return _not_sent(SETTLE, int(payment_id))
    try:
        result = settle(rt, int(payment_id))
    except Exception as exc:
        # Under its account, so support sees it on the account's page, and one row per payment, so
        # one payment's failure is not another's.
        handle_failure(self, _as_failure(exc), account_of(rt.engine, ACCOUNT, int(payment_id)), args, per_args=True)
        raise
    deferred = result.outcome == "busy"
    if deferred and waited < BUSY_RETRIES:
        # Another settlement of the account is running; this payment's turn comes after it (and if
        # these run out, the beat sweep comes back for it). A task of its own, not a retry: waiting
        # spends none of the retries its failures have. A re-drive of a stuck row passes the row on:
        # the run that settles resolves it.
        stuck_id = stuck_id_of(self.request.id)
        try:
            # Without a result, as every send nobody reads (tasks/sweeps.py): told to keep one,
            # Celery's Redis result backend subscribes before the broker is tried, and with Redis
            # down the send waited out the backend's reconnection (about 20 s) first.
            self.apply_async([payment_id], {"waited": waited + 1}, countdown=BUSY_COUNTDOWN,
                             task_id=None if stuck_id is None else task_id_for(stuck_id), ignore_result=True)
        except Exception as exc:  # kombu's connection errors: the beat sweep comes back for it
            log.warning("settlement of bad-debt payment %s not sent again: %s", payment_id, exc)
    if not deferred:
        # Also in a run sent for later by a busy one (a new task, no retries of its own), whose row
        # its earlier failures wrote: one UPDATE of this payment's rows, and settlements are few.
        resolve_stuck(rt.engine, SETTLE, result.account_id, args)
    if result.reopened is not None:
        enqueue_settlement(self.app, result.reopened)
    if result.settled_elsewhere or result.alerted:  # its alert row was written with the settlement
        metrics.BAD_DEBT_OVERPAID.inc()
    if result.enqueue and result.account_id:
        _recompute(self.app, result.account_id, int(payment_id))
    for owner in result.owners_to_enqueue:  # the account its customer moved to
        _recompute(self.app, owner, int(payment_id))
    return {"payment_id": result.payment_id, "account_id": result.account_id, "outcome": result.outcome,
            "invoices": list(result.invoices), DEFERRED: deferred}


@shared_task(name="tasks.settle_unsettled_bad_debt_payments", bind=True, ignore_result=True)
def settle_unsettled_bad_debt_payments(self: Task) -> dict[str, Any]:
    rt = runtime_for(self.app)
    if not rt.settings.stripe_api_key:
        log.warning("bad-debt payments are not settled: %s", NO_KEY)
        return {"found": 0, "sent": 0, "skipped": NO_KEY, DEFERRED: True}
    try:
        ids = unsettled(rt)
    except Exception as exc:
        handle_failure(self, exc, None, {})
        raise
    return {"found": len(ids), "sent": _send_each(self.app, SETTLE, ids)}


@shared_task(name=RECONCILE, bind=True)
def reconcile_bad_debt_payment(self: Task, payment_id: int) -> dict[str, Any]:
    rt = runtime_for(self.app)
    args = {"payment_id": int(payment_id)}
    if not rt.settings.stripe_api_key:
        return _not_sent(RECONCILE, int(payment_id))
    try:
        result = reconcile(rt, int(payment_id), datetime.now(UTC))
    except Exception as exc:
        handle_failure(self, _as_failure(exc), account_of(rt.engine, ACCOUNT, int(payment_id)), args, per_args=True)
        raise
    metrics.BAD_DEBT_RECONCILED.labels(result.outcome).inc()
    # Also in a run beat sent afresh (no retries of its own) after an earlier run gave up: its row,
    # dead or retrying, is this payment's. One UPDATE of this payment's rows; reconciliations are few.
    resolve_stuck(rt.engine, RECONCILE, result.account_id, args)
    if result.settle is not None:  # if the broker is down, the settlement sweep finds it (pending, charged)
        enqueue_settlement(self.app, result.settle)
    if result.enqueue and result.account_id:
        _recompute(self.app, result.account_id, int(payment_id))
    for owner in result.owners_to_enqueue:  # the account its customer moved to
        _recompute(self.app, owner, int(payment_id))
    return {"payment_id": result.payment_id, "account_id": result.account_id, "outcome": result.outcome}


@shared_task(name="tasks.reconcile_bad_debt_payments", bind=True, ignore_result=True)
def reconcile_bad_debt_payments(self: Task) -> dict[str, Any]:
    """Payments pending past the guard window, each due its next check: one task each. A claim
    whose task was never queued is checked again at its next due time."""
    rt = runtime_for(self.app)
    if not rt.settings.stripe_api_key:  # claimed, each check would move the payment's next one on
        log.warning("bad-debt payments are not reconciled with Stripe: %s", NO_KEY)
        return {"due": 0, "sent": 0, "skipped": NO_KEY, DEFERRED: True}
    try:
        ids = due(rt, datetime.now(UTC))
    except Exception as exc:
        handle_failure(self, exc, None, {})
        raise
    return {"due": len(ids), "sent": _send_each(self.app, RECONCILE, ids)}


@shared_task(name=OVERPAID, bind=True)
def bad_debt_overpayment_refunded(self: Task, payment_id: int) -> dict[str, Any]:
    """The alert of an overpayment (a dead stuck row under this name, per payment) is for an
    operator, who refunds the customer at Stripe and then re-drives the row: this task, which
    changes nothing, succeeds, and the row becomes resolved. No other task's success resolves it."""
    log.info("overpayment of bad-debt payment %s marked refunded by an operator", payment_id)
    return {"payment_id": int(payment_id), "acknowledged": True}


@shared_task(name=REFUNDED_AFTER_SETTLEMENT, bind=True)
def bad_debt_refund_after_settlement_reviewed(self: Task, payment_id: int) -> dict[str, Any]:
    """The alert of a bad-debt payment refunded after it settled the debt: an operator billed it
    again (or wrote it off) and re-drives the row; this task, which changes nothing, resolves it."""
    log.info("refund after settlement of bad-debt payment %s reviewed by an operator", payment_id)
    return {"payment_id": int(payment_id), "acknowledged": True}


@shared_task(name=DISPUTED, bind=True)
def bad_debt_dispute_reviewed(self: Task, payment_id: int) -> dict[str, Any]:
    """The alert of a bad-debt payment whose charge is disputed: an operator answered the dispute
    (and, if it was lost, billed the debt again or wrote it off) and re-drives the row; this task,
    which changes nothing, resolves it."""
    log.info("dispute of bad-debt payment %s reviewed by an operator", payment_id)
    return {"payment_id": int(payment_id), "acknowledged": True}
