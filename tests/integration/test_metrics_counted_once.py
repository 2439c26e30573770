"""DESIGN 9: a counter moves once per real occurrence, also when the task that counts it runs again
(a message redelivered after its worker was killed, the same outcome's second webhook)."""

from __future__ import annotations

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
