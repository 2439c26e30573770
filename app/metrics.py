"""Prometheus metrics (DESIGN section 9). One registry of names for the web app and the workers.

Processes that fork (gunicorn workers, Celery prefork children) share counters through
prometheus_client's multiprocess mode when PROMETHEUS_MULTIPROC_DIR is set (the launcher and the
Procfile set it); otherwise each process exposes its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

WEBHOOKS_RECEIVED = Counter("dunning_webhooks_received_total", "Stripe webhooks accepted", ["type", "state"])
WEBHOOKS_REJECTED = Counter("dunning_webhooks_rejected_total", "Stripe webhooks rejected", ["reason"])
# How many webhooks shared one commit (webhooks/group_commit.py): 1 under no load, more under load.
WEBHOOK_BATCH = Histogram("dunning_webhook_batch_events", "Webhook events stored by one group commit",
                          buckets=(1, 2, 4, 8, 16, 32, 64))
RECOMPUTES = Counter("dunning_recomputes_total", "Recomputes by trigger and outcome", ["trigger", "outcome"])
RECOMPUTE_NOOP = Counter("dunning_recompute_noop_total", "Recomputes that wrote nothing", ["trigger"])
RECOMPUTE_SECONDS = Histogram(
    "dunning_recompute_seconds", "Recompute duration by step", ["step"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
# The whole run, lock wait to commit (the sum of its steps above), by trigger: a run's percentiles,
# which the steps' do not add up to.
RECOMPUTE_DURATION = Histogram(
    "dunning_recompute_duration_seconds", "Recompute duration, from the wait for the account's lock to the commit",
    ["trigger"], buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
DOMAIN_EVENTS = Counter("dunning_domain_events_total", "Domain events emitted", ["event"])
DRIFT_FOUND = Counter("dunning_drift_found_total", "Accounts found drifted by the sweep", ["in_stage"])
# Every remediation the sweep requested (recorded remediated in drift_record): sent, or deferred when the
# broker refused the send (its request stays; beat's stale-request re-drive sends it).
DRIFT_REMEDIATED = Counter("dunning_drift_remediated_total", "Drift remediations the sweep requested: recomputes "
                           "sent, or deferred (the broker refused the send; beat's re-drive sends the request later)")
SWEEP_ERRORS = Counter("dunning_sweep_errors_total", "Drift sweep errors by kind (unreadable, compute, request, "
                       "enqueue, failed)", ["kind"])
RETRIES = Counter("dunning_payment_retries_total", "Payment retries by failure class and outcome",
                  ["failure_class", "outcome"])
BAD_DEBT_ENTRIES = Counter("dunning_bad_debt_entries_total", "Accounts entering bad debt", ["reason", "product"])
BAD_DEBT_EXITS = Counter("dunning_bad_debt_exits_total", "Accounts leaving bad debt", ["how", "product"])
BAD_DEBT_RECONCILED = Counter("dunning_bad_debt_reconciled_total",
                              "Checks with Stripe of bad-debt payments whose outcome never arrived", ["outcome"])
BAD_DEBT_NOT_RUN = Counter("dunning_bad_debt_payments_not_run_total", "Bad-debt payments answered 503: Stripe did "
                           "not run (or answer) the request (rate_limited, key_refused, no_connection, no_answer)",
                           ["why"])
BAD_DEBT_OVERPAID = Counter("dunning_bad_debt_overpaid_total",
                            "Bad-debt payments that also covered invoices settled some other way meanwhile")
BAD_DEBT_SECONDS = Histogram(
    "dunning_bad_debt_duration_seconds", "Time spent in bad debt",
    buckets=(3600, 86400, 3 * 86400, 7 * 86400, 30 * 86400, 90 * 86400, 365 * 86400),
)
ATTEMPT_DETAIL = Counter("dunning_attempt_detail_asked_total",
                         "Failed invoices whose attempt detail Stripe's API was asked for, by what it gave",
                         ["outcome"])
INVOICE_LINES = Counter("dunning_invoice_lines_fetched_total",
                        "Invoices whose event carried their first lines only, whose whole list Stripe's API "
                        "was asked for, by what came of it (fetched: stored; not_stored: another writer stored "
                        "the whole list first; error)", ["outcome"])
HISTORY_PRUNED = Counter("dunning_history_pruned_total", "History rows older than HISTORY_RETENTION_DAYS removed, "
                         "by table (app/history/prune.py)", ["table"])
# Sign-ins at /support/login refused, by why (a fixed set: no token, actor or address in a label): "token"
# (matches no SUPPORT_TOKENS entry), "cross_origin" (a form another site's page posted: app/support/views.py).
SIGN_IN_FAILURE_REASONS: Final = ("token", "cross_origin")
SUPPORT_SIGN_IN_FAILURES = Counter("dunning_support_sign_in_failures_total",
                                   "Support sign-ins refused (token: matches no support token; cross_origin: "
                                   "posted from another site's page)", ["reason"])
for _reason in SIGN_IN_FAILURE_REASONS:  # each served from the start, at 0: a rate of 0 is an answer too
    SUPPORT_SIGN_IN_FAILURES.labels(reason=_reason)
TASK_FAILURES = Counter("dunning_task_failures_total", "Task failures by task and failure class",
                        ["task", "failure_class", "action"])
# Gauges read from the database by the collector at scrape time (see app/api/metrics.py), and by the
# tasks and views that count the same rows. They describe the fleet, not a process: the newest write,
# by whichever process, is the truth ("mostrecent"; a dead process's file stays but is older). Under
# "max" an older higher value won, any process's: a step back or a drained backlog never showed.
# Only ever set(): prometheus_client refuses inc()/dec() in this mode.
FLEET: Final = "mostrecent"
STUCK_IN_LIFTING = Gauge("dunning_stuck_in_lifting", "Accounts in lifting longer than the guard window",
                         multiprocess_mode=FLEET)
OUTBOX_BACKLOG = Gauge("dunning_outbox_backlog", "Domain events not yet delivered", multiprocess_mode=FLEET)
OUTBOX_BLOCKED = Gauge("dunning_outbox_blocked", "Domain events not yet delivered that Account Management refused "
                       "as wrong (a 4xx other than 408/409/425/429, or a 409 for over 1 h): each holds back its "
                       "account's later events until delivered or skipped (dunning outbox list --blocked)",
                       multiprocess_mode=FLEET)
STUCK_EVENTS = Gauge("dunning_stuck_events", "Stuck work by state", ["state"], multiprocess_mode=FLEET)
ROLLOUT_STAGE = Gauge("dunning_rollout_stage", "Remediation rollout stage index (0 = off)", multiprocess_mode=FLEET)


def registry() -> CollectorRegistry:
    """The registry to expose: the multiprocess aggregate when configured, else this process's."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        return reg
    from prometheus_client import REGISTRY

    return REGISTRY


class RefreshFirst:
    """The registry to serve, with ``refresh`` run before each collection: the worker's endpoint
    reads the fleet gauges from the database at scrape time, as the web's /metrics does, rather
    than showing what a task of that process last set (a stage since changed, a backlog since
    drained)."""

    def __init__(self, registry: CollectorRegistry, refresh: Callable[[], object]) -> None:
        self._registry = registry
        self._refresh = refresh

    def collect(self) -> Iterator[Any]:
        self._refresh()
        yield from self._registry.collect()

    def restricted_registry(self, names: Iterable[str]) -> Any:  # a scrape asking for some names only
        self._refresh()
        return self._registry.restricted_registry(names)


def exposition() -> tuple[bytes, str]:
    return generate_latest(registry()), CONTENT_TYPE_LATEST
