"""What the beat passes that ask Stripe about one invoice after another share (the attempt detail,
app/payments/attempt_detail.py; the invoice lines, app/payments/invoice_lines.py): one pass at a time
across the fleet, no ask started after the pass's time budget, and which of Stripe's errors end the
pass or say nothing about the invoice asked about. A pass Stripe rate-limited waits what the 429's
``Retry-After`` asked (at most MAX_PAUSE_SECONDS) before the next asks anything, whichever worker
beat's tick lands on (stripe_pass_pause, by the database's clock)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import stripe
from sqlalchemy import Connection

from app.db import session_lock, unit_of_work
from app.payments.stripe_client import KEY_REFUSED, make_stripe_client
from app.runtime import Runtime
from tasks.failures import retry_after_seconds

log = logging.getLogger(__name__)

# Errors that say nothing about the invoice: the same question may be answered next pass.
PASSING = (stripe.APIConnectionError, stripe.APIError, stripe.RateLimitError)
# Errors that no other invoice would escape either: the pass ends.
ENDS_PASS = (stripe.RateLimitError, *KEY_REFUSED)


def about_the_invoice(exc: stripe.StripeError) -> bool:
    """Whether Stripe refused the question about this invoice itself (``resource_missing``, say),
    rather than answering nothing for now or refusing every question."""
    return not isinstance(exc, PASSING + ENDS_PASS)


# The longest a rate limit's Retry-After holds a pass back: an answer asking for hours (or a proxy's
# garbage) must not stop asking for that long. Beat's next tick asks again after it.
MAX_PAUSE_SECONDS = 600.0
# Held back by a rate limit, by the database's clock (which set it, PAUSE).
PAUSED = "SELECT 1 FROM stripe_pass_pause WHERE name = %(name)s AND not_before > now()"
PAUSE = """
INSERT INTO stripe_pass_pause (name, not_before) VALUES (%(name)s, now() + make_interval(secs => %(secs)s))
ON CONFLICT (name) DO UPDATE SET not_before = EXCLUDED.not_before
"""

Outcome = Literal["ran", "busy", "paused"]


def pause_after(rt: Runtime, lock: str, exc: stripe.StripeError) -> float | None:
    """After a pass ``lock`` ended on ``exc``: a rate limit's Retry-After (in seconds, at most
    MAX_PAUSE_SECONDS) holds the next passes back, across ticks and workers -> the seconds, or None
    (not a rate limit, no Retry-After: the next tick asks). A failure to write it is logged: the
    next tick asks then, as before."""
    if not isinstance(exc, stripe.RateLimitError):
        return None
    seconds = retry_after_seconds(exc.headers)
    if seconds is None or seconds <= 0:
        return None
    seconds = min(seconds, MAX_PAUSE_SECONDS)
    try:
        with unit_of_work(rt.engine) as conn:
            conn.exec_driver_sql(PAUSE, {"name": lock, "secs": seconds})
    except Exception:
        log.warning("could not hold the %s pass back %.0f s for Stripe's rate limit", lock, seconds, exc_info=True)
        return None
    return seconds


def run_pass(rt: Runtime, lock: str, read_due: Callable[[Connection], Sequence[Any]],
             ask: Callable[[stripe.StripeClient, Any], bool], budget_seconds: float) -> Outcome:
    """Under the advisory lock ``lock``, ``ask`` Stripe about each row ``read_due`` reads, in order,
    until one answers False (the pass ends) or ``budget_seconds`` have passed. ``busy`` when another
    pass held the lock, ``paused`` while a rate limit holds the pass back (pause_after): this one did
    nothing. Raises what ``read_due`` and ``ask`` raise."""
    with session_lock(rt.engine, lock) as got:
        if not got:
            return "busy"
        with rt.engine.connect() as conn:
            if conn.exec_driver_sql(PAUSED, {"name": lock}).first() is not None:
                return "paused"
            due = read_due(conn)
        deadline = time.monotonic() + budget_seconds
        client = make_stripe_client(rt.settings) if due else None
        for row in due:
            if client is None or time.monotonic() > deadline:
                break
            if not ask(client, row):
                break
    return "ran"
