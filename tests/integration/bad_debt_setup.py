"""Accounts in bad debt, through the real webhook endpoint and a real recompute."""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from flask.testing import FlaskClient
from sqlalchemy import Engine

from app.config import Settings
from app.recompute.observe import observe
from app.recompute.service import run_recompute
from app.runtime import Runtime
from tasks.queues import PAYMENTS
from tests.conftest import Accounts, post_event, service_headers
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
                  product: str = "prod_premium", amount: int = 1000, days_ago: int = 30, paid: int = 0,
                  currency: str = "usd") -> InBadDebt:
    """An invoice of ``amount`` (``paid`` of it paid; minor units of ``currency``) marked
    uncollectible ``days_ago``, a default card on file, recomputed: bad debt of the rest."""
    account, customer = accounts.create()
    t = int(time.time()) - days_ago * DAY
    invoice = unique("in")
    evt = with_product(event("invoice.marked_uncollectible", id=invoice, customer=customer, created=t,
                             amount_due=amount, amount_remaining=amount - paid, amount_paid=paid, total=amount,
                             currency=currency, paths={"created": t - DAY}), product, amount)
    assert post_event(client, evt).status_code == 200
    pm = unique("pm")
    updated = event("customer.updated", id=customer, created=t, paths={"invoice_settings.default_payment_method": pm})
    assert post_event(client, updated).status_code == 200
    summary = recompute(engine, runtime, account)
    assert summary["status"] == "bad_debt", summary
    return InBadDebt(account, customer, invoice, amount - paid, pm, evt["data"]["object"])


def pay(client: FlaskClient, body: Any, key: str | None = None, headers: dict[str, str] | None = None) -> Any:
    """POST /pay-bad-debt with a service token (``headers={}`` for none) and the Idempotency-Key."""
    h = dict(service_headers() if headers is None else headers)
    if key is not None:
        h["Idempotency-Key"] = key
    return client.post("/pay-bad-debt", json=body, headers=h)


def key() -> str:
    return uuid.uuid4().hex


def payments(engine: Engine, account: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT * FROM bad_debt_payment WHERE account_id = %(a)s ORDER BY id",
                                    {"a": account}).mappings().all()
    return [dict(r) for r in rows]


def intent_event(kind: str, debt: InBadDebt, intent_id: str, payment_id: int, decline: str | None = None) -> dict:
    """payment_intent.succeeded / payment_failed for the bad-debt intent. The fixtures hold only the
    payment_failed envelope: the success is that same shape with its type and status values changed."""
    evt = event("payment_intent.payment_failed", id=intent_id, customer=debt.customer, amount=debt.amount,
                currency=debt.invoice_object.get("currency", "usd"), payment_method=debt.payment_method,
                metadata={"account_id": debt.account, "bad_debt_payment_id": str(payment_id)},
                paths={"last_payment_error.decline_code": decline} if decline else None)
    if kind == "succeeded":
        evt["type"] = "payment_intent.succeeded"
        evt["data"]["object"].update(status="succeeded", last_payment_error=None)
    return evt


def refund(client: FlaskClient, debt: InBadDebt, intent_id: str, amount: int | None = None) -> None:
    """Stripe's charge.refunded for the bad-debt payment's charge (an operator refunded it)."""
    refunded = event("charge.refunded", id=unique("ch"), customer=debt.customer, payment_intent=intent_id,
                     amount=debt.amount, amount_refunded=debt.amount if amount is None else amount,
                     currency=debt.invoice_object.get("currency", "usd"))
    assert post_event(client, refunded).status_code == 200


def take_queued_settlements(settings: Settings) -> list[int]:
    """The payments whose settlement is on the broker, oldest first; taken off the queue (no worker
    runs in these tests)."""
    return [args[0] for _task_id, args in take_queued(settings, "tasks.settle_bad_debt_payment")]


def take_queued(settings: Settings, task: str) -> list[tuple[str, list[Any]]]:
    """The task id and arguments of each ``task`` on the payments queue, oldest first; the queue is
    emptied."""
    queue = redis.Redis.from_url(settings.broker_url)
    try:
        raw = queue.lrange(f"{settings.broker_key_prefix}{PAYMENTS}", 0, -1)
        queue.delete(f"{settings.broker_key_prefix}{PAYMENTS}")
    finally:
        queue.close()
    messages = [json.loads(m) for m in reversed(raw)]  # LPUSH in, RPOP out: the oldest is last
    return [(m["headers"]["id"], json.loads(base64.b64decode(m["body"]))[0]) for m in messages
            if m["headers"]["task"] == task]
