"""tasks.dispatch_due_retries (beat), tasks.retry_payment, tasks.fetch_attempt_detail (beat) and
tasks.fetch_invoice_lines (beat), on the payments queue."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from celery import Task, shared_task

from app import metrics
from app.dispatch import BrokerUnavailable, enqueue_recompute, send
from app.domain.triggers import Trigger
from app.payments.attempt_detail import fetch_missing_detail
from app.payments.invoice_lines import fetch_incomplete_lines
from app.payments.pay import PayResult
from app.payments.pay import retry_payment as pay_retry
from app.payments.retries import claim_due, expire_unsent
from app.payments.stripe_client import NO_KEY, make_stripe_client
from app.stuck_work import DEFERRED
from tasks.failures import FailureKind, TaskFailure, account_of, resolve_stuck
from tasks.recompute import handle_failure
from tasks.runtime import runtime_for

log = logging.getLogger(__name__)

RETRY_PAYMENT = "tasks.retry_payment"


@shared_task(name="tasks.dispatch_due_retries", bind=True, ignore_result=True)
def dispatch_due_retries(self: Task) -> dict[str, Any]:
    rt = runtime_for(self.app)
    now, guard = datetime.now(UTC), rt.policy.guard_window_minutes
    # Without a key (make run's default) nothing can be charged: the due retries stay planned,
    # unclaimed, rather than each asking Stripe with no key and failing for hours.
    keyed = bool(rt.settings.stripe_api_key)
    try:
        expired = expire_unsent(rt.engine, now, guard_minutes=guard)
        ids = claim_due(rt.engine, now, guard_minutes=guard) if keyed else []
    except Exception as exc:
        handle_failure(self, exc, None, {})
        raise
    for account_id in expired:
        try:
            enqueue_recompute(self.app, account_id, Trigger.STATE_REFRESH.value, "retry:never_sent")
        except BrokerUnavailable as exc:  # the request row stays: beat's stale-request re-drive sends it
            log.warning("could not queue the recompute of %s: %s", account_id, exc)
    if not keyed:
        log.warning("payment retries are not dispatched: %s", NO_KEY)
        return {"claimed": 0, "sent": 0, "skipped": NO_KEY, DEFERRED: True}
    sent = 0
    for retry_id in ids:
        try:
            send(self.app, RETRY_PAYMENT, [retry_id], ignore_result=True)
            sent += 1
        except BrokerUnavailable as exc:  # the row stays dispatched; the next tick sends it again
            log.warning("could not queue retry %s: %s", retry_id, exc)
    return {"claimed": len(ids), "sent": sent}


# Outcomes of a message delivered again, not of a retry (dunning_payment_retries_total counts each
# retry once): done (its outcome is in), busy (another worker is charging it), missing.
NOT_A_RETRY = frozenset({"busy", "done", "missing"})


@shared_task(name=RETRY_PAYMENT, bind=True)
def retry_payment(self: Task, retry_id: int) -> dict[str, Any]:
    rt = runtime_for(self.app)
    # Stuck rows under the account, so support sees them on its page, and one per retry: two retries
    # of an account failing at once are re-driven each, and one's success resolves only its own.
    args = {"retry_id": int(retry_id)}
    if not rt.settings.stripe_api_key:
        # Sent before the key was removed: not charged. The row stays claimed and unsent; the
        # dispatcher skips it once the guard window has passed (expire_unsent) and the account's
        # recompute plans it again. Deferred: a re-driven stuck row (a row left charging, which only
        # its re-drive sends again) stays for a run with the key.
        log.warning("retry %s not charged: %s", retry_id, NO_KEY)
        return {"retry_id": int(retry_id), "outcome": "not_sent", "detail": NO_KEY,
                DEFERRED: True}
    try:
        result = pay_retry(rt.engine, make_stripe_client(rt.settings), int(retry_id), datetime.now(UTC),
                           guard_minutes=rt.policy.guard_window_minutes, policy=rt.policy)
    except Exception as exc:
        # An attempt that met a failure is counted in dunning_task_failures_total; the retry counts
        # once it has an outcome.
        account = account_of(rt.engine, "SELECT account_id FROM payment_retry WHERE id = %(id)s", retry_id)
        handle_failure(self, exc, account, args, per_args=True)
        raise
    if result.outcome not in NOT_A_RETRY:
        metrics.RETRIES.labels(failure_class=result.failure_class or "-", outcome=result.outcome).inc()
    if result.recompute and result.account_id:
        _recompute(self.app, result.account_id, result)
    if result.outcome == "refused":
        # Stripe turned the request down (a revoked key, a missing permission): dead stuck work for
        # an operator, now that the recompute that applies the refused backoff is on its way. Our
        # key refused is named as the bad-debt tasks name it (credentials_refused), dead all the
        # same: the retry is over, and its re-drive would charge nothing.
        kind = FailureKind.CREDENTIALS_REFUSED if result.credentials_refused else FailureKind.PERMANENT_API_ERROR
        refused = TaskFailure(kind, f"Stripe refused the request: {result.detail}")
        handle_failure(self, refused, result.account_id, args, per_args=True, dead=True)
        raise refused  # handle_failure always raises; this keeps type checkers honest
    if result.account_id and (self.request.retries or result.outcome not in NOT_A_RETRY):
        # The retry has its outcome: the work of every earlier run of it that gave up (retrying, or
        # dead: killed with its process, say) is done, also in a run sent afresh (the dispatch sends a
        # row still dispatched again). Not a message delivered again once it was done (a refusal's
        # dead row is for an operator), nor one that found another worker charging it.
        resolve_stuck(rt.engine, RETRY_PAYMENT, result.account_id, args)
    return {"retry_id": result.retry_id, "outcome": result.outcome, "detail": result.detail}


def _recompute(app: Any, account_id: str, result: PayResult) -> None:
    """The account's recompute after the retry's outcome."""
    try:
        # Backed by the committed request row (coalesced), or by none: then it must run.
        enqueue_recompute(app, account_id, Trigger.STATE_REFRESH.value,
                          f"retry:{result.retry_id}:{result.outcome}", coalesced=result.requested)
    except BrokerUnavailable as exc:
        # A request row is re-driven by beat; a decline's webhook brings a recompute anyway; a
        # skipped row that is still planned is re-armed by the next dispatch, which comes back here.
        log.warning("could not queue the recompute after retry %s: %s", result.retry_id, exc)


@shared_task(name="tasks.fetch_attempt_detail", bind=True, ignore_result=True)
def fetch_attempt_detail(self: Task) -> dict[str, Any]:
    """Beat: ask Stripe why a failed invoice failed when no webhook said (app/payments/attempt_detail.py)."""
    rt = runtime_for(self.app)
    if not rt.settings.stripe_api_key:  # nothing to ask with (make run's default): not a failure
        return {"skipped": NO_KEY, DEFERRED: True}
    try:
        report = fetch_missing_detail(rt, self.app, datetime.now(UTC))
    except Exception as exc:
        handle_failure(self, exc, None, {})
        raise
    if report.asked:
        log.info("attempt detail from Stripe: %s", report.to_json())
    if report.paused:  # held back by Stripe's rate limit: a stuck row of an earlier tick stays for one that ran
        return {**report.to_json(), DEFERRED: True}
    return report.to_json()


@shared_task(name="tasks.fetch_invoice_lines", bind=True, ignore_result=True)
def fetch_invoice_lines(self: Task) -> dict[str, Any]:
    """Beat: the whole list of lines of the unpaid invoices whose event carried the first ones only
    (app/payments/invoice_lines.py)."""
    rt = runtime_for(self.app)
    if not rt.settings.stripe_api_key:
        # Nothing to ask with (make run's default): the invoices stay incomplete (compute's reasons
        # say so) until a key is set. Deferred: a stuck row of an earlier tick stays for one that ran.
        log.warning("invoice lines are not fetched from Stripe: %s", NO_KEY)
        return {"skipped": NO_KEY, DEFERRED: True}
    try:
        report = fetch_incomplete_lines(rt, self.app, datetime.now(UTC))
    except Exception as exc:
        handle_failure(self, exc, None, {})
        raise
    if report.asked:
        log.info("invoice lines from Stripe: %s", report.to_json())
    if report.paused:  # held back by Stripe's rate limit: a stuck row of an earlier tick stays for one that ran
        return {**report.to_json(), DEFERRED: True}
    return report.to_json()
