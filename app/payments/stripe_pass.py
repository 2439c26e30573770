"""What the beat passes that ask Stripe about one invoice after another share (the attempt detail,
app/payments/attempt_detail.py; the invoice lines, app/payments/invoice_lines.py): one pass at a time
across the fleet, no ask started after the pass's time budget, and which of Stripe's errors end the
pass or say nothing about the invoice asked about."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import stripe
from sqlalchemy import Connection

from app.db import session_lock
from app.payments.stripe_client import KEY_REFUSED, make_stripe_client
from app.runtime import Runtime

# Errors that say nothing about the invoice: the same question may be answered next pass.
PASSING = (stripe.APIConnectionError, stripe.APIError, stripe.RateLimitError)
# Errors that no other invoice would escape either: the pass ends.
ENDS_PASS = (stripe.RateLimitError, *KEY_REFUSED)


def about_the_invoice(exc: stripe.StripeError) -> bool:
    """Whether Stripe refused the question about this invoice itself (``resource_missing``, say),
    rather than answering nothing for now or refusing every question."""
    return not isinstance(exc, PASSING + ENDS_PASS)


def run_pass(rt: Runtime, lock: str, read_due: Callable[[Connection], Sequence[Any]],
             ask: Callable[[stripe.StripeClient, Any], bool], budget_seconds: float) -> bool:
    """Under the advisory lock ``lock``, ``ask`` Stripe about each row ``read_due`` reads, in order,
    until one answers False (the pass ends) or ``budget_seconds`` have passed. False when another
    pass held the lock (this one did nothing). Raises what ``read_due`` and ``ask`` raise."""
    with session_lock(rt.engine, lock) as got:
        if not got:
            return False
        with rt.engine.connect() as conn:
            due = read_due(conn)
        deadline = time.monotonic() + budget_seconds
        client = make_stripe_client(rt.settings) if due else None
        for row in due:
            if client is None or time.monotonic() > deadline:
                break
            if not ask(client, row):
                break
    return True
