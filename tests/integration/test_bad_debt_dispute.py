"""A bad-debt payment's charge disputed (a chargeback): its money may go back to the customer
while the invoices it paid out of band stay paid, as with a refund after settlement."""

from __future__ import annotations

import copy
import json
from functools import cache
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import Engine

from app.payments.bad_debt_settle import settle
from tests.conftest import post_event
from tests.integration.bad_debt_setup import InBadDebt, intent_event, key, pay, payments
from tests.stripe_events import FIXTURES, event, unique

DISPUTE_TASK = "tasks.bad_debt_dispute_reviewed"


@cache
def _dispute_fixture() -> dict[str, Any]:
    """Stripe's dispute object from the fixtures' source file (no file of its own in the folder)."""
    loaded: dict[str, Any] = json.loads((FIXTURES / "source" / "fixtures3.json").read_text())["resources"]["dispute"]
    return loaded


def dispute_event(intent_id: str, charge_id: str, amount: int) -> dict[str, Any]:
    """charge.dispute.created: a derived charge event's envelope (Stripe's event shape) around
    Stripe's dispute fixture, its ids and amount set to the payment's charge."""
    evt = event("charge.refunded")
    evt["type"] = "charge.dispute.created"
    evt["data"].pop("previous_attributes", None)
    dispute = copy.deepcopy(_dispute_fixture())
    dispute.update(id=unique("dp"), charge=charge_id, payment_intent=intent_id, amount=amount)
    evt["data"]["object"] = dispute
    return evt


def stuck_rows(engine: Engine, task: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.exec_driver_sql(
            "SELECT id, account_id, state, error, task_args FROM subs_stuck_events WHERE task_name = %(t)s "
            "ORDER BY id", {"t": task}).mappings()]


def test_a_charge_disputed_after_settlement_is_put_before_an_operator(client: FlaskClient, engine, runtime,
                                                                      debtor: InBadDebt, stripe_fake, celery_app):
    """The customer's bank takes the money back (a chargeback) after the payment paid the invoices
    out of band: unless the dispute is won, the debt is cleared with nothing in, and nobody bills it
    again. Like a refund after settlement, an operator is told, once per payment."""
    from app.stuck_work import task_id_for
    from tasks import stuck  # noqa: F401  a re-driven task's success resolves its row
    from tasks.bad_debt import DISPUTED

    assert DISPUTED == DISPUTE_TASK

    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert response.status_code == 202
    intent_id, payment_id = response.json["stripe_payment_intent_id"], int(response.json["payment_id"])
    assert post_event(client, intent_event("succeeded", debtor, intent_id, payment_id)).status_code == 200
    assert settle(runtime, payment_id).outcome == "settled"
    charge_id = stripe_fake.intents[intent_id]["latest_charge"]

    assert post_event(client, dispute_event(intent_id, charge_id, debtor.amount)).status_code == 200
    [alert] = stuck_rows(engine, DISPUTE_TASK)
    assert (alert["account_id"], alert["state"], alert["task_args"]) == (debtor.account, "dead",
                                                                         {"payment_id": payment_id})
    assert alert["error"].startswith("disputed:") and debtor.invoice in alert["error"]
    assert payments(engine, debtor.account)[0]["state"] == "succeeded"  # what happened stays recorded
    assert post_event(client, dispute_event(intent_id, charge_id, debtor.amount)).status_code == 200
    assert len(stuck_rows(engine, DISPUTE_TASK)) == 1  # one open alert per payment

    celery_app.tasks[DISPUTE_TASK].apply([payment_id], task_id=task_id_for(alert["id"])).get()
    assert stuck_rows(engine, DISPUTE_TASK)[0]["state"] == "resolved"


def test_a_dispute_of_a_charge_that_is_no_bad_debt_payment_alerts_nothing(client: FlaskClient, engine, debtor,
                                                                         stripe_fake):
    """An ordinary charge's dispute is stored and acknowledged, with no bad-debt alert."""
    response = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert response.status_code == 202
    other = unique("pi")
    assert post_event(client, dispute_event(other, unique("ch"), 500)).status_code == 200
    assert stuck_rows(engine, DISPUTE_TASK) == []
