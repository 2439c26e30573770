"""Levels that rise with time alone: compute says when its decision would next change with no new
event, and beat's re-drive recomputes the account then. Without it an account whose card was
declined as permanent (no retries, so no more events) stayed at `notice` for ever."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from app.recompute.service import run_recompute
from app.redrive import redrive
from tests.conftest import Accounts, post_event
from tests.integration.dunning_setup import dunning_row
from tests.stripe_events import event, unique, with_product

DAY = 86400


def test_a_permanent_decline_escalates_on_time_with_no_further_event(client, accounts: Accounts, engine, runtime,
                                                                     celery_app):
    account, customer = accounts.create()
    failed_at = int(time.time()) - DAY
    invoice = unique("in")
    evt = event("invoice.payment_failed", id=invoice, customer=customer, created=failed_at, amount_due=5000,
                amount_remaining=5000, amount_paid=0, attempt_count=1, paths={"created": failed_at - DAY})
    assert post_event(client, with_product(evt, "prod_core", 5000)).status_code == 200
    charge = event("charge.failed", id=unique("ch"), customer=customer, payment_intent=unique("pi"),
                   failure_code="card_declined", created=failed_at, paths={"created": failed_at,
                                                                           "outcome.reason": "expired_card"})
    assert post_event(client, charge).status_code == 200
    now = datetime.now(UTC)
    first = run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED", now)
    assert first.decision is not None
    assert first.decision.state.level == "notice" and first.decision.state.next_retry_at is None
    stored = dunning_row(engine, account)
    # permanent for 3 days: restrict_premium (the next threshold of the default policy's rules)
    assert stored["next_review_at"] == datetime.fromtimestamp(failed_at, UTC) + timedelta(days=3)

    assert redrive(engine, celery_app, now=now)["reviewed"] == 0  # not due yet
    due = stored["next_review_at"] + timedelta(seconds=1)
    assert redrive(engine, celery_app, now=due)["reviewed"] == 1
    reviewed = run_recompute(engine, runtime.policy, account, "STATE_REFRESH", due)
    assert reviewed.decision is not None
    assert reviewed.decision.state.level == "restrict_premium"
    after = dunning_row(engine, account)
    assert after["level"] == "restrict_premium"
    assert after["next_review_at"] == datetime.fromtimestamp(failed_at, UTC) + timedelta(days=7)
    # and on to bad debt at day 21, where the design puts it (retries exhausted: none are tried)
    day_21 = datetime.fromtimestamp(failed_at, UTC) + timedelta(days=21, seconds=1)
    at_day_21 = run_recompute(engine, runtime.policy, account, "STATE_REFRESH", day_21)
    assert at_day_21.decision is not None
    assert at_day_21.decision.state.status == "bad_debt"
