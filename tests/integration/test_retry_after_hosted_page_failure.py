"""A payment retry is never charged right after an attempt the customer or Stripe made on the invoice
(the hosted invoice page, Stripe's own retry) that the stored decision did not know of.

Since API 2025-03-31 neither ``charge.failed`` nor ``payment_intent.payment_failed`` names its invoice:
the invoice's own intent, declined again on the hosted page, is an attempt row linked to no invoice
(only ``invoice_payment.paid`` links one, once paid). The worker's check "a newer payment attempt was
made on the invoice" read linked attempts only, so the retry went to Stripe seconds after the customer's
own decline whenever the recompute that would have replanned it had not run yet (a backlog; here the
test holds the account's recompute lock, as a running recompute of the account does).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from app.payments.pay import retry_payment
from app.payments.retries import claim_due
from app.payments.stripe_client import make_stripe_client
from app.recompute.service import run_recompute
from tests.conftest import Accounts, post_event
from tests.integration.dunning_setup import dunning_row, retries
from tests.integration.test_outbox_cancellation_body import failed_invoice
from tests.stripe_events import event, unique

DAY = 86400
# The per-account lock of app/recompute/service.py (same key), held session-level by the test: a
# recompute of the account waits for it (tests/integration/test_worker_kill.py does the same).
HOLD_ACCOUNT_SQL = "SELECT pg_advisory_lock(hashtextextended(%(account)s, 7281))"
RELEASE_ACCOUNT_SQL = "SELECT pg_advisory_unlock(hashtextextended(%(account)s, 7281))"


@contextmanager
def recompute_held(engine: Engine, account: str) -> Iterator[None]:
    """No recompute of the account completes meanwhile (a recompute backlog)."""
    with engine.connect() as holder:
        holder.exec_driver_sql(HOLD_ACCOUNT_SQL, {"account": account})
        holder.commit()
        try:
            yield
        finally:
            holder.exec_driver_sql(RELEASE_ACCOUNT_SQL, {"account": account})
            holder.commit()


def declined(customer: str, intent: str, at: int) -> dict:
    """charge.failed of the invoice's intent (which it does not name: API 2025-03-31 and later)."""
    return event("charge.failed", id=unique("ch"), customer=customer, payment_intent=intent,
                 payment_method="card_old", failure_code="card_declined", created=at,
                 paths={"created": at, "outcome.reason": "insufficient_funds"})


def retry_due(client, accounts: Accounts, engine: Engine, runtime) -> tuple[str, str, str, str]:
    """An invoice declined transiently a day and 10 minutes ago on its intent; its first retry is
    due (10 minutes ago). (account, customer, invoice, intent)"""
    account, customer = accounts.create()
    failed_at = int(time.time() - DAY - 600)
    invoice, intent = unique("in"), unique("pi")
    assert post_event(client, failed_invoice(customer, invoice, failed_at)).status_code == 200
    assert post_event(client, declined(customer, intent, failed_at)).status_code == 200
    run_recompute(engine, runtime.policy, account, "STATE_REFRESH", datetime.now(UTC))
    stored = dunning_row(engine, account)
    assert stored["retry_invoice_id"] == invoice and stored["next_retry_at"] <= datetime.now(UTC), stored
    return account, customer, invoice, intent


def charge(engine: Engine, runtime, retry_id: int, after: timedelta) -> str:
    return retry_payment(engine, make_stripe_client(runtime.settings), retry_id, datetime.now(UTC) + after,
                         policy=runtime.policy).outcome


def test_a_decline_on_the_hosted_page_just_after_the_claim_stops_the_retry(client, accounts, engine, runtime,
                                                                          fake_stripe):
    """Beat claims the due retry; seconds later the customer tries the card on the hosted invoice page
    and it is declined (charge.failed of the invoice's intent, naming no invoice); the worker picks
    the retry up before the account is recomputed: not charged."""
    account, customer, invoice, intent = retry_due(client, accounts, engine, runtime)
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    with recompute_held(engine, account):
        assert post_event(client, declined(customer, intent, int(time.time()) + 5)).status_code == 200
        assert charge(engine, runtime, retry_id, timedelta(seconds=40)) == "skipped"
    (row,) = retries(engine, account)
    assert row["state"] == "skipped" and "newer payment attempt" in row["error"], row
    assert fake_stripe.pay_requests(invoice) == []


def test_a_retry_waits_for_the_recompute_of_a_decline_the_decision_did_not_know_of(client, accounts, engine,
                                                                                  runtime, fake_stripe):
    """The customer's hosted-page decline is in the mirror, its recompute still pending, when beat ticks
    (the claim would record that attempt as one the decision saw, and the worker let it through): the
    retry is not claimed. The recompute spaces it after that decline, and it is charged on its new day."""
    account, customer, invoice, intent = retry_due(client, accounts, engine, runtime)
    declined_at = int(time.time())
    with recompute_held(engine, account):
        assert post_event(client, declined(customer, intent, declined_at)).status_code == 200
        claimed = claim_due(engine, datetime.now(UTC) + timedelta(seconds=30))
        assert claimed == []
    assert fake_stripe.pay_requests(invoice) == [] and retries(engine, account) == []

    run_recompute(engine, runtime.policy, account, "STATE_REFRESH", datetime.now(UTC))
    due = dunning_row(engine, account)["next_retry_at"]
    assert due >= datetime.fromtimestamp(declined_at, UTC) + timedelta(days=1), due  # its gap after that charge
    assert claim_due(engine, datetime.now(UTC) + timedelta(seconds=30)) == []
    (retry_id,) = claim_due(engine, due + timedelta(seconds=30))
    assert charge(engine, runtime, retry_id, due - datetime.now(UTC) + timedelta(seconds=40)) == "sent"
    assert len(fake_stripe.pay_requests(invoice)) == 1


def test_a_retry_skipped_for_a_newer_attempt_is_not_claimed_again_before_the_recompute(client, accounts, engine,
                                                                                      runtime, fake_stripe):
    """The worker skipped the claimed retry for the hosted-page decline after it; the next tick comes
    before the account's recompute: the stale decision still says due under the same key, and the
    skipped row is not re-armed from it (it would record the decline as seen and be charged)."""
    account, customer, invoice, intent = retry_due(client, accounts, engine, runtime)
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    with recompute_held(engine, account):
        assert post_event(client, declined(customer, intent, int(time.time()) + 5)).status_code == 200
        assert charge(engine, runtime, retry_id, timedelta(seconds=40)) == "skipped"
        assert claim_due(engine, datetime.now(UTC) + timedelta(seconds=60)) == []
        assert charge(engine, runtime, retry_id, timedelta(seconds=70)) == "done"
    assert [r["state"] for r in retries(engine, account)] == ["skipped"]
    assert fake_stripe.pay_requests(invoice) == []
