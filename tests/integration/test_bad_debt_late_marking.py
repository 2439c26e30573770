"""A failure in bad debt is one whatever the delivery delay of the marking that made the bad debt.

in0 is marked uncollectible on day 5 (Stripe's time): bad debt. in1, declined on an expired card
(its dunning run out), fails again on day 8 for want of funds, on the same payment intent: a failure
in bad debt, which reopens nothing (README "In bad debt only money gets an account out"). Stripe
redelivers an event for up to 3 days when our endpoint was down: invoice.marked_uncollectible
delivered on day 9 opens the episode's row on day 9, after in1's failure. The account must end as
the one whose events came on time: suspended, no retry, retry.ran_out_bad_debt.

Real webhook endpoint (signed), database and fixtures; each delivery recomputed at its own moment
(freezegun), twice (the second writes nothing); the last recompute at the wall clock, with in1
old enough for the bad-debt rule.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from freezegun import freeze_time

from tests.conftest import post_event
from tests.integration.test_order_independence_events import (
    INVOICE_EVENTS,
    Step,
    _transitions,
    final_state,
    recompute_twice,
    render,
)
from tests.stripe_events import unique

DAY = 86400


def _history(start: int) -> list[Step]:
    in0 = {"inv": "in0", "pi": "pi0", "product": "prod_premium"}
    in1 = {"inv": "in1", "pi": "pi1", "product": "prod_core"}
    day5, day8 = start + 5 * DAY, start + 8 * DAY
    steps: list[Step] = [
        (start - 2 * DAY, "payment_method.attached", {"pm": "pm0"}),
        (start - 2 * DAY, "customer.updated", {"pm": "pm0", "changed": True}),
        (start - 2 * DAY, "customer.subscription.updated", {"status": "active"}),
    ]
    for t, inv, decline in ((start - DAY, in0, "insufficient_funds"), (start, in1, "expired_card")):
        failed = {**inv, "charge": f"ch_{inv['inv']}_0", "pm": "pm0", "decline": decline}
        steps += [(t, "invoice.finalized", inv), (t, "invoice.payment_failed", {**inv, "attempt_count": 1}),
                  (t, "charge.failed", failed), (t, "payment_intent.payment_failed", failed)]
    steps.append((day5, "invoice.marked_uncollectible", {**in0, "status": "uncollectible"}))
    again = {**in1, "charge": "ch_in1_1", "pm": "pm0", "decline": "insufficient_funds"}
    steps += [(day8, "invoice.payment_failed", {**in1, "attempt_count": 2}), (day8, "charge.failed", again),
              (day8, "payment_intent.payment_failed", again)]
    return [(t, kind, {**p, "transitions": _transitions(steps, n)} if kind in INVOICE_EVENTS else p)
            for n, (t, kind, p) in enumerate(steps)]


def _deliver(client, engine, runtime, accounts, history: list[Step], deliveries: list[tuple[int, list[int]]],
             now: datetime) -> dict:
    """Each (moment, events) of ``deliveries`` posted and recomputed at that moment; a last recompute at ``now``."""
    account, customer = accounts.create()
    s = unique("s")
    for at, steps in deliveries:
        moment = datetime.fromtimestamp(at, UTC)
        with freeze_time(moment):
            for n in steps:
                assert post_event(client, render(n, history[n], s, customer)).status_code == 200
            recompute_twice(engine, runtime, account, moment)
    recompute_twice(engine, runtime, account, now)
    return final_state(client, engine, account, customer, s)


def test_a_marking_delivered_after_a_failure_in_its_bad_debt_decides_as_on_time(client, accounts, engine, runtime):
    now = datetime.now(UTC).replace(microsecond=0)
    start = int(time.time()) - 40 * DAY
    history = _history(start)
    marking = next(n for n, step in enumerate(history) if step[1] == "invoice.marked_uncollectible")
    on_time = [(t, [n]) for n, (t, _, _) in enumerate(history)]
    # invoice.marked_uncollectible redelivered on day 9, after in1's failure of day 8.
    late = [(t, [n]) for n, (t, _, _) in enumerate(history) if n != marking]
    late.append((start + 9 * DAY, [marking]))

    expected = _deliver(client, engine, runtime, accounts, history, on_time, now)
    dunning = expected["dunning"]
    assert (dunning["status"], dunning["level"], dunning["bad_debt"]) == ("bad_debt", "suspended", True)
    assert dunning["next_retry_at"] is None and dunning["entitlements"]["products"]["prod_core"] == "revoked"
    assert any(r["rule"] == "retry.ran_out_bad_debt" and r["facts"]["invoice"] == "in1_S"
               for r in dunning["reasons"]), dunning["reasons"]

    assert _deliver(client, engine, runtime, accounts, history, late, now) == expected
