"""Signed Stripe events built from the real fixtures in ../shared/stripe-fixtures.

Only ids and values are overridden; the shapes are Stripe's (see the fixtures' README).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import time
from functools import cache
from pathlib import Path
from typing import Any

import stripe

SHARED = Path(os.environ.get("DUNNING_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")
FIXTURES = SHARED / "stripe-fixtures"
_ids = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}x{next(_ids)}x{time.monotonic_ns() % 10**9}"


@cache
def _load(path: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(Path(path).read_text())
    return loaded


def resource(name: str) -> dict[str, Any]:
    """A Stripe API object fixture (invoice, charge, payment_method, ...)."""
    return copy.deepcopy(_load(str(FIXTURES / f"{name}.json")))


def set_path(obj: Any, path: str, value: Any) -> None:
    """set_path(invoice, "lines.data.0.amount", 500)"""
    parts = path.split(".")
    for part in parts[:-1]:
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    last = parts[-1]
    if isinstance(obj, list):
        obj[int(last)] = value
    else:
        obj[last] = value


def event(event_type: str, *, event_id: str | None = None, created: int | None = None,
          paths: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """A derived event of ``event_type``; ``overrides`` replace keys of data.object, ``paths``
    set nested values of data.object by dotted path."""
    evt = copy.deepcopy(_load(str(FIXTURES / "derived-events" / f"{event_type}.json")))
    evt["id"] = event_id or unique("evt")
    evt["created"] = int(created if created is not None else time.time())
    obj = evt["data"]["object"]
    if obj.get("object") == "subscription":
        # The subscription fixture has its payment collection paused (mark_uncollectible), which makes
        # its new invoices forgiven, no debt: an ordinary subscription unless a test pauses it.
        obj["pause_collection"] = None
    for key, value in overrides.items():
        if key not in obj:
            raise KeyError(f"{event_type} fixture has no data.object.{key}: do not invent shapes")
        obj[key] = value
    for path, value in (paths or {}).items():
        set_path(obj, path, value)
    return evt


def with_product(invoice_event: dict[str, Any], product: str, amount: int | None = None) -> dict[str, Any]:
    """Point the invoice's first line at ``product`` (line.pricing.price_details, Stripe's current shape)."""
    line = invoice_event["data"]["object"]["lines"]["data"][0]
    line["pricing"] = {"type": "price_details", "unit_amount_decimal": None,
                       "price_details": {"price": f"price_{product}", "product": product}}
    if amount is not None:
        line["amount"] = amount
    return invoice_event


def sign(payload: str, secret: str, timestamp: int | None = None) -> str:
    return stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp=timestamp)


def body_and_headers(evt: dict[str, Any], secret: str, timestamp: int | None = None) -> tuple[str, dict[str, str]]:
    payload = json.dumps(evt)
    return payload, {"Stripe-Signature": sign(payload, secret, timestamp), "Content-Type": "application/json"}
