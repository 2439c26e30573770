"""GET /metrics for the web app, and the workers' endpoint with prefork children (multiprocess mode)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import uuid
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from tests.conftest import post_event, wait_for
from tests.integration.bad_debt_setup import into_bad_debt, recompute
from tests.stripe_events import event, with_product


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metrics(client: FlaskClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return scrape(response.get_data(as_text=True))


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_when_a_bad_debt_episode_opens_and_closes(client, engine: Engine, runtime, accounts):
    before = metrics(client)
    debt = into_bad_debt(client, engine, runtime, accounts, product="prod_premium")
    opened = metrics(client)
    entries = "dunning_bad_debt_entries_total"
    assert value(opened, entries, reason="marked_uncollectible", product="prod_premium") == \
        value(before, entries, reason="marked_uncollectible", product="prod_premium") + 1
    assert value(opened, "dunning_bad_debt_open_episodes") == 1

    paid = with_product(event("invoice.paid", id=debt.invoice, customer=debt.customer, amount_remaining=0,
                              amount_paid=debt.amount, amount_due=debt.amount), "prod_premium", debt.amount)
    assert post_event(client, paid).status_code == 200
    assert recompute(engine, runtime, debt.account)["status"] == "current"
    closed = metrics(client)
    exits = "dunning_bad_debt_exits_total"
    # counted under the products the account was in bad debt for (the decision has none left by then)
    assert value(closed, exits, how="paid", product="prod_premium") == \
        value(opened, exits, how="paid", product="prod_premium") + 1
    assert value(closed, exits, how="paid", product="-") == value(opened, exits, how="paid", product="-")
    assert value(closed, "dunning_bad_debt_duration_seconds_count") == \
        value(opened, "dunning_bad_debt_duration_seconds_count") + 1
    assert value(closed, "dunning_bad_debt_open_episodes") == 0


def test_database_gauges_are_read_at_scrape_time(client, engine: Engine, runtime, accounts):
    debt = into_bad_debt(client, engine, runtime, accounts)
    with engine.begin() as conn:
        # A bad-debt payment in flight for longer than the guard window (30 min by default).
        conn.exec_driver_sql("INSERT INTO bad_debt_payment (account_id, idempotency_key, request_fingerprint, amount, "
                             "created_at, updated_at) VALUES (%(a)s, 'k', 'f', 1000, now() - interval '40 minutes', "
                             "now() - interval '40 minutes')", {"a": debt.account})
        conn.exec_driver_sql("INSERT INTO subs_stuck_events (account_id, task_name, error_class, error, state) "
                             "VALUES (%(a)s, 't', 'x', 'e', 'dead'), (%(a)s, 't2', 'x', 'e', 'retrying')",
                             {"a": debt.account})
    assert recompute(engine, runtime, debt.account)["status"] == "lifting"
    samples = metrics(client)
    assert value(samples, "dunning_stuck_in_lifting") == 1
    assert value(samples, "dunning_stuck_events", state="dead") == 1
    assert value(samples, "dunning_stuck_events", state="retrying") == 1
    assert value(samples, "dunning_stuck_events", state="resolved") == 0
    assert value(samples, "dunning_bad_debt_payments_pending") == 1
    with engine.connect() as conn:
        backlog = conn.exec_driver_sql("SELECT count(*) FROM outbox WHERE delivered_at IS NULL").scalar_one()
        stage = conn.exec_driver_sql("SELECT stage FROM rollout_state WHERE id = 1").scalar_one()
    assert backlog > 0 and value(samples, "dunning_outbox_backlog") == backlog
    assert value(samples, "dunning_rollout_stage") == ("off", "named", "5", "10", "25", "50", "100").index(stage)
    assert value(samples, "dunning_metrics_db_refresh_ok") == 1
    for name in ("dunning_webhooks_received_total", "dunning_recomputes_total", "dunning_recompute_seconds_count"):
        assert any(n == name for n, _ in samples), name



def test_task_failures_are_counted_by_task_class_and_action(client, celery_app, accounts):
    """dunning_task_failures_total{task, failure_class, action}: a retry, a give-up beat re-drives
    (retrying), and one for an operator (dead), for every task that handles its failures."""
    from celery.exceptions import Retry

    import tasks.recompute  # noqa: F401  (registers the task)
    from app.db import DatabaseUnavailable, ValueRejected
    from tasks.failures import POLICIES, FailureKind
    from tasks.recompute import handle_failure

    account, _ = accounts.create()
    task = celery_app.tasks["tasks.recompute_account"]
    args = {"account_id": account, "trigger": "MANUAL", "cause": None}
    before = metrics(client)
    cases = ((DatabaseUnavailable("database connection lost"), 0, Retry),
             (DatabaseUnavailable("database connection lost"), POLICIES[FailureKind.DATABASE_UNAVAILABLE].max_retries,
              DatabaseUnavailable),
             (ValueRejected("integer out of range"), 0, ValueRejected))
    try:
        for n, (exc, retries, raised) in enumerate(cases):
            task.push_request(retries=retries, id=f"t-count-{n}", called_directly=False, args=[account], kwargs={})
            try:
                with pytest.raises(raised):
                    handle_failure(task, exc, account, args)
            finally:
                task.pop_request()
    finally:
        celery_app.control.purge()  # the retry's message
    after = metrics(client)
    name = "dunning_task_failures_total"
    for kind, action in (("database_unavailable", "retry"), ("database_unavailable", "retrying"),
                         ("invalid_data", "dead")):
        labels = {"task": "tasks.recompute_account", "failure_class": kind, "action": action}
        assert value(after, name, **labels) == value(before, name, **labels) + 1, labels


def test_a_failed_recompute_is_counted_by_trigger_with_outcome_failed(client, celery_app):
    """dunning_recomputes_total{trigger, outcome}: a run that raised counts as "failed", next to the
    changed and unchanged ones. It counted nowhere (only dunning_task_failures_total, which has no
    trigger)."""
    import tasks.recompute  # noqa: F401  (registers the task)

    task = celery_app.tasks["tasks.recompute_account"]
    labels = {"trigger": "MANUAL", "outcome": "failed"}
    before = value(metrics(client), "dunning_recomputes_total", **labels)
    # An account id PostgreSQL cannot hold (a NUL character): invalid data, given up at once as dead.
    result = task.apply(kwargs={"account_id": "acct_\x00", "trigger": "MANUAL"})
    assert result.failed()
    assert value(metrics(client), "dunning_recomputes_total", **labels) == before + 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.worker
def test_worker_metrics_aggregate_prefork_children(settings, engine: Engine, accounts):
    """A real `celery -A tasks worker` with two prefork children: the tasks run in the children and
    the main process's endpoint shows their counts."""
    from app.dispatch import enqueue_recompute
    from tasks.factory import make_celery

    # Under the session's prefix, so the session's cleanup removes this worker's keys too.
    prefix = f"{settings.broker_key_prefix}metrics-{uuid.uuid4().hex[:8]}:"
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="dunning-prom-") as prom_dir:
        env = {**os.environ, "DATABASE_URL": settings.database_url, "CELERY_BROKER_URL": settings.broker_url,
               "CELERY_BROKER_KEY_PREFIX": prefix, "PROMETHEUS_MULTIPROC_DIR": prom_dir,
               "WORKER_METRICS_PORT": str(port), "WORKER_METRICS_ADDR": "127.0.0.1",
               "STRIPE_WEBHOOK_SECRET": "x", "SECRET_KEY": "x"}
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool", "prefork", "--concurrency", "2",
             "-Q", "recompute", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            def scrape_worker() -> Any:
                try:
                    return scrape(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text)
                except requests.RequestException:
                    if worker.poll() is not None:
                        died = worker.stderr.read().decode() if worker.stderr else "worker died"
                        raise AssertionError(died) from None
                    return None

            wait_for(scrape_worker, timeout=60, interval=0.2, message="worker metrics endpoint")
            sender = make_celery(settings.with_overrides(broker_key_prefix=prefix))
            ids = [accounts.create()[0] for _ in range(4)]
            for account in ids:
                enqueue_recompute(sender, account, "MANUAL", "metrics-test", coalesced=False)

            def counted() -> Any:
                samples = scrape_worker() or {}
                total = sum(v for (n, labels), v in samples.items()
                            if n == "dunning_recomputes_total" and ("trigger", "MANUAL") in labels)
                return total >= 4 and samples

            samples = wait_for(counted, timeout=60, interval=0.2, message="recomputes counted by the children")
            assert sum(v for (n, labels), v in samples.items()
                       if n == "dunning_recomputes_total" and ("trigger", "MANUAL") in labels) == 4
            files = os.listdir(prom_dir)
            assert any(f.startswith("counter_") for f in files)
            # The children wrote them (their pids name the files), not the main process.
            pids = {f.rsplit("_", 1)[-1].split(".")[0] for f in files if f.startswith("counter_")}
            assert str(worker.pid) not in pids or len(pids) > 1
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def test_a_webhook_answered_503_counts_as_rejected_unavailable(settings, celery_app, clean):
    """dunning_webhooks_rejected_total{reason}: a webhook the database could not take (503, Stripe
    redelivers it) counted nowhere, so an outage showed as webhooks simply stopping."""
    from app import create_app
    from app import metrics as app_metrics
    from app.runtime import Runtime
    from tests.integration.test_webhook_ingest import failed_invoice
    from tests.stripe_events import unique

    down = settings.with_overrides(database_url="postgresql+psycopg2://postgres@127.0.0.1:1/nothing")
    app = create_app(down, runtime=Runtime.build(down), celery=celery_app)
    rejected = app_metrics.WEBHOOKS_REJECTED.labels("unavailable")
    before = rejected._value.get()
    assert post_event(app.test_client(), failed_invoice(unique("cus"))).status_code == 503
    assert rejected._value.get() == before + 1


def test_worker_metrics_read_the_fleet_gauges_from_the_database_at_scrape(celery_app, engine: Engine, runtime,
                                                                           clean, monkeypatch):
    """The worker's /metrics showed the fleet gauges a task of that process last set (a rollout stage
    an operator has since changed, a backlog since drained): a second, stale series next to the
    web's. Like the web's, it reads them from the database before each scrape."""
    from types import SimpleNamespace

    from app import metrics_db
    from tasks import metrics as worker_metrics

    metrics_db.refresh(engine, runtime.policy.guard_window_minutes)  # the process's value: the present
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO subs_stuck_events (account_id, task_name, error_class, error, state) "
                             "VALUES ('acct_metrics_worker', 't', 'x', 'e', 'dead')")
        dead = conn.exec_driver_sql("SELECT count(*) FROM subs_stuck_events WHERE state = 'dead'").scalar_one()
    port = _free_port()
    monkeypatch.setenv(worker_metrics.PORT_ENV, str(port))
    monkeypatch.setenv(worker_metrics.ADDR_ENV, "127.0.0.1")
    worker_metrics._on_worker_ready(sender=SimpleNamespace(app=celery_app))
    try:
        samples = scrape(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
    finally:
        worker_metrics.stop_metrics_server()
    assert value(samples, "dunning_stuck_events", state="dead") == dead
    assert value(samples, "dunning_metrics_db_refresh_ok") == 1


def test_worker_metrics_are_served_when_the_runtime_cannot_be_built(settings, clean, monkeypatch, tmp_path):
    """The worker's scrape builds its runtime on first use; a policy file that has become unreadable
    since the worker started made every scrape fail (no counters at all) instead of serving them
    with dunning_metrics_db_refresh_ok 0, as a database that cannot be read does."""
    from types import SimpleNamespace

    from tasks import metrics as worker_metrics

    broken = SimpleNamespace(dunning_settings=settings.with_overrides(policy_path=str(tmp_path / "gone.yaml")))
    port = _free_port()
    monkeypatch.setenv(worker_metrics.PORT_ENV, str(port))
    monkeypatch.setenv(worker_metrics.ADDR_ENV, "127.0.0.1")
    worker_metrics._on_worker_ready(sender=SimpleNamespace(app=broken))
    try:
        response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    finally:
        worker_metrics.stop_metrics_server()
    assert response.status_code == 200
    samples = scrape(response.text)
    assert value(samples, "dunning_metrics_db_refresh_ok") == 0
    assert "dunning_recompute_seconds" in response.text  # the process's own series, served all the same


def test_a_recompute_run_is_timed_whole_from_the_lock_wait_to_the_commit(client, celery_app, accounts):
    """DESIGN 9's recompute duration: dunning_recompute_duration_seconds{trigger} times each run as
    a whole, the wait for the account's lock included. Only the steps after the lock were timed
    (dunning_recompute_seconds{step}), whose percentiles do not add up to a run's."""
    import tasks.recompute  # noqa: F401  (registers the task)

    account, _ = accounts.create()
    before = metrics(client)
    result = celery_app.tasks["tasks.recompute_account"].apply(kwargs={"account_id": account, "trigger": "MANUAL"})
    assert result.successful()
    after = metrics(client)
    for name, labels in (("dunning_recompute_duration_seconds_count", {"trigger": "MANUAL"}),
                         ("dunning_recompute_seconds_count", {"step": "lock"})):
        assert value(after, name, **labels) == value(before, name, **labels) + 1, name


def test_a_recompute_run_again_counts_a_no_op_and_no_second_bad_debt_entry(client, engine: Engine, runtime, accounts):
    """Guard: entries and time in bad debt are counted from the events of a change, once per episode;
    a second run that finds nothing to change is a no-op recompute and counts neither again."""
    debt = into_bad_debt(client, engine, runtime, accounts, product="prod_premium")
    before = metrics(client)
    assert recompute(engine, runtime, debt.account)["status"] == "bad_debt"
    after = metrics(client)
    entries = {"reason": "marked_uncollectible", "product": "prod_premium"}
    assert value(after, "dunning_bad_debt_entries_total", **entries) == \
        value(before, "dunning_bad_debt_entries_total", **entries)
    assert value(after, "dunning_recompute_noop_total", trigger="MANUAL") == \
        value(before, "dunning_recompute_noop_total", trigger="MANUAL") + 1
    assert value(after, "dunning_recomputes_total", trigger="MANUAL", outcome="unchanged") == \
        value(before, "dunning_recomputes_total", trigger="MANUAL", outcome="unchanged") + 1
    assert value(after, "dunning_bad_debt_duration_seconds_count") == \
        value(before, "dunning_bad_debt_duration_seconds_count")


def test_worker_metrics_on_an_ipv6_address_written_as_in_a_url(settings, clean, monkeypatch):
    """WORKER_METRICS_ADDR=[::1], as FLOWER_ADDRESS takes it: the worker looked '[::1]' up as a host
    name and served no metrics (its error named the port), and make run refused it as no address."""
    from types import SimpleNamespace

    from app import launcher
    from tasks import metrics as worker_metrics

    port = _free_port()
    env = {worker_metrics.PORT_ENV: str(port), worker_metrics.ADDR_ENV: " [::1] "}
    launcher.check_worker_metrics_port(env, 0.0)  # make run's check: free, and an address of this machine
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    worker_metrics._on_worker_ready(sender=SimpleNamespace(app=SimpleNamespace(dunning_settings=settings)))
    try:
        response = requests.get(f"http://[::1]:{port}/metrics", timeout=5)
    finally:
        worker_metrics.stop_metrics_server()
    assert response.status_code == 200 and "dunning_recompute_seconds" in response.text
