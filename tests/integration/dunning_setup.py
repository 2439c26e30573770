"""Histories through the real webhook endpoint, for the payment and worker tests."""

from __future__ import annotations

import time
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import Engine

from tests.conftest import post_event, wait_for
from tests.stripe_events import event, unique, with_product

DAY = 86400


def dunning_row(engine: Engine, account: str) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT * FROM subs_dunning WHERE account_id = %(a)s", {"a": account}).mappings()
        found = row.first()
    return dict(found) if found else {}


def retries(engine: Engine, account: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT * FROM payment_retry WHERE account_id = %(a)s ORDER BY id",
                                    {"a": account}).mappings().all()
    return [dict(r) for r in rows]


def recompute_pending(engine: Engine, account: str) -> bool:
    """Whether a recompute of the account is requested and not yet run (dispatch claims none of its
    retries meanwhile: app/payments/retries.py DUE_SQL)."""
    with engine.connect() as conn:
        return bool(conn.exec_driver_sql(
            "SELECT EXISTS (SELECT 1 FROM recompute_request WHERE account_id = %(a)s "
            "AND parked_touch IS DISTINCT FROM touched_at)", {"a": account}).scalar())


def failed_invoice(client: FlaskClient, engine: Engine, account: str, customer: str, decline: str,
                   days_ago: float = 2, amount: int = 5000) -> str:
    """An open invoice whose payment failed ``days_ago`` with ``decline``; waits for the recompute."""
    t = int(time.time() - days_ago * DAY)
    invoice = unique("in")
    evt = event("invoice.payment_failed", id=invoice, customer=customer, created=t, amount_due=amount,
                amount_remaining=amount, amount_paid=0, attempt_count=1, billing_reason="subscription_cycle",
                paths={"created": t - DAY})
    assert post_event(client, with_product(evt, "prod_core", amount)).status_code == 200
    charge = event("charge.failed", id=unique("ch"), customer=customer, payment_intent=unique("pi"),
                   failure_code="card_declined", created=t + 1, paths={"created": t + 1, "outcome.reason": decline})
    assert post_event(client, charge).status_code == 200
    wait_for(lambda: dunning_row(engine, account).get("last_failure_id") is not None, message="failure recomputed")
    return invoice


def paid(client: FlaskClient, engine: Engine, account: str, customer: str, invoice: str) -> None:
    evt = event("invoice.paid", id=invoice, customer=customer, amount_remaining=0, amount_paid=5000)
    assert post_event(client, with_product(evt, "prod_core", 5000)).status_code == 200
    wait_for(lambda: dunning_row(engine, account).get("status") == "current", message="invoice paid recomputed")


def method_attached(client: FlaskClient, customer: str, created: int | None = None) -> str:
    pm = unique("pm")
    assert post_event(client, event("payment_method.attached", id=pm, customer=customer,
                                    created=created or int(time.time()))).status_code == 200
    return pm
