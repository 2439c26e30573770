"""DESIGN 9: a counter moves once per real occurrence, also when the task that counts it runs again
(a message redelivered after its worker was killed, the same outcome's second webhook)."""

from __future__ import annotations

import json
from pathlib import Path

from flask.testing import FlaskClient
from sqlalchemy import Engine

from tests.integration.bad_debt_setup import InBadDebt, payments, refund
from tests.integration.test_bad_debt_reconcile import take_queued_settlements
from tests.integration.test_bad_debt_settle_review import charged_payment, overpaid_alerts
from tests.integration.test_metrics import metrics, value

OVERPAID = "dunning_bad_debt_overpaid_total"


def test_a_refunded_payments_settlement_run_again_counts_no_second_overpayment(
        client: FlaskClient, engine: Engine, debtor: InBadDebt, stripe_fake, settings, celery_app):
    """A bad-debt payment refunded in part before it settled: the customer is owed the rest, one
    overpayment (one alert). The settlement's message delivered again (its worker killed after the
    commit, before the ack) finds the payment failed, its charge succeeded and refunded, and runs the
    refund path again: the alert is not written twice, and the counter must not move twice."""
    from tasks.bad_debt import SETTLE

    payment_id = charged_payment(client, debtor)
    take_queued_settlements(settings)  # the webhook's: run here instead
    refund(client, debtor, payments(engine, debtor.account)[0]["stripe_payment_intent_id"], amount=300)
    before = metrics(client)
    assert celery_app.tasks[SETTLE].apply([payment_id]).get()["outcome"] == "refunded"
    once = metrics(client)
    assert value(once, OVERPAID) == value(before, OVERPAID) + 1
    assert len(overpaid_alerts(engine)) == 1

    assert celery_app.tasks[SETTLE].apply([payment_id]).get()["outcome"] == "refunded"  # delivered again
    assert len(overpaid_alerts(engine)) == 1
    assert value(metrics(client), OVERPAID) == value(once, OVERPAID)


def test_a_cli_recompute_counts_its_bad_debt_entry_where_the_metrics_directory_points(
        client: FlaskClient, accounts, database_url: str, tmp_path: Path):
    """`dunning recompute ACCOUNT` is a recompute like the task's: it applies and emits the same
    events (here the account enters bad debt), so it counts them the same way. It counted nothing:
    an entry into (or exit from) bad debt made from the command line was missing from
    dunning_bad_debt_entries_total / _exits_total / _duration_seconds and from the recomputes by
    trigger, even with PROMETHEUS_MULTIPROC_DIR naming the folder the worker's endpoint aggregates."""
    import time

    from prometheus_client import CollectorRegistry, multiprocess

    from tests.conftest import post_event
    from tests.integration.test_cli_recompute import dunning
    from tests.stripe_events import event, with_product

    account, customer = accounts.create()
    created = int(time.time()) - 30 * 86400
    uncollectible = with_product(event("invoice.marked_uncollectible", customer=customer, created=created,
                                       amount_due=1000, amount_remaining=1000, amount_paid=0, total=1000,
                                       paths={"created": created - 86400}), "prod_premium", 1000)
    assert post_event(client, uncollectible).status_code == 200
    folder = tmp_path / "metrics"
    folder.mkdir()
    done = dunning("recompute", account, "--json", database_url=database_url, PROMETHEUS_MULTIPROC_DIR=str(folder))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "bad_debt"

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(folder))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in registry.collect() for s in f.samples}
    assert samples.get(("dunning_bad_debt_entries_total",
                        (("product", "prod_premium"), ("reason", "marked_uncollectible")))) == 1
    assert samples.get(("dunning_recomputes_total", (("outcome", "changed"), ("trigger", "MANUAL")))) == 1


RETRIES = "dunning_payment_retries_total"


def _retries_counted(samples: dict) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: n for (name, labels), n in samples.items() if name == RETRIES}


def test_a_payment_retry_is_counted_once_whatever_its_task_attempts_and_deliveries(
        client: FlaskClient, accounts, engine: Engine, celery_app, worker, fake_stripe):
    """DESIGN 9's retries by failure class: one payment retry, one count, by its outcome. Each task
    attempt that met a passing failure (a 429, already in dunning_task_failures_total) counted as well,
    under failure class "-", and so did the message delivered again once the retry was done ("done"):
    a retry rate limited twice and delivered twice counted four."""
    from datetime import UTC, datetime

    from app.payments.retries import claim_due
    from tests.fakes import fake_stripe as outcomes
    from tests.integration.dunning_setup import failed_invoice

    account, customer = accounts.create()
    failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    fake_stripe.script(outcomes.rate_limit(retry_after=1), outcomes.rate_limit(retry_after=1))
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    task = celery_app.tasks["tasks.retry_payment"]
    before = _retries_counted(metrics(client))

    assert task.apply(args=[retry_id]).get()["outcome"] == "sent"  # its two retries run at once (eager)
    assert task.apply(args=[retry_id]).get()["outcome"] == "done"  # the message delivered again

    after = _retries_counted(metrics(client))
    moved = {labels: n - before.get(labels, 0.0) for labels, n in after.items() if n != before.get(labels, 0.0)}
    assert moved == {(("failure_class", "transient"), ("outcome", "sent")): 1.0}, moved
