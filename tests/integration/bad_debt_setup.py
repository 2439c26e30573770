"""Accounts in bad debt, through the real webhook endpoint and a real recompute."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import Engine

from app.recompute.observe import observe
from app.recompute.service import run_recompute
from app.runtime import Runtime
from tests.conftest import Accounts, post_event
from tests.stripe_events import event, unique, with_product

DAY = 86400


@dataclass(frozen=True)
class InBadDebt:
    account: str
    customer: str
    invoice: str
    amount: int
    payment_method: str
    invoice_object: dict[str, Any]


def dunning_row(engine: Engine, account: str) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT * FROM subs_dunning WHERE account_id = %(a)s", {"a": account}).mappings()
        found = row.first()
    return dict(found) if found else {}


def recompute(engine: Engine, runtime: Runtime, account: str, trigger: str = "MANUAL") -> dict[str, Any]:
    result = run_recompute(engine, runtime.policy, account, trigger, datetime.now(UTC))
    observe(result)  # count it like the task does
    return result.summary()


def into_bad_debt(client: FlaskClient, engine: Engine, runtime: Runtime, accounts: Accounts,
                  product: str = "prod_premium", amount: int = 1000, days_ago: int = 30) -> InBadDebt:
    """An invoice marked uncollectible ``days_ago``, a default card on file, recomputed: bad debt."""
    account, customer = accounts.create()
    t = int(time.time()) - days_ago * DAY
    invoice = unique("in")
    evt = with_product(event("invoice.marked_uncollectible", id=invoice, customer=customer, created=t,
                             amount_due=amount, amount_remaining=amount, amount_paid=0, total=amount,
                             paths={"created": t - DAY}), product, amount)
    assert post_event(client, evt).status_code == 200
    pm = unique("pm")
    updated = event("customer.updated", id=customer, created=t, paths={"invoice_settings.default_payment_method": pm})
    assert post_event(client, updated).status_code == 200
    summary = recompute(engine, runtime, account)
    assert summary["status"] == "bad_debt", summary
    return InBadDebt(account, customer, invoice, amount, pm, evt["data"]["object"])
