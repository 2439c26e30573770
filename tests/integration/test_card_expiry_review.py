"""A card's expiry is a review moment: beat recomputes the account when the card expires, with no event.

Found by an audit: subs_mandate (read by other teams) said `expired` only once something recomputed
the account after the card's expiry month had ended, and nothing did: a current account with no
events kept showing `usable` for an expired card for ever (no review moment at a card's expiry, and
the drift sweep does not compare mandates). compute now stores the card's expiry instant as the
account's next review (subs_dunning.next_review_at), and beat's re-drive recomputes the account then.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from freezegun import freeze_time

from tests.conftest import post_event, wait_for
from tests.integration.dunning_setup import dunning_row
from tests.stripe_events import event, unique

pytestmark = pytest.mark.worker

# The card is valid through December 2026 (UTC): expired from this moment on.
EXPIRY = datetime(2027, 1, 1, tzinfo=UTC)


def mandates(engine, account: str) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT * FROM subs_mandate WHERE account_id = %(a)s",
                                    {"a": account}).mappings().all()
    return {r["payment_method_id"]: dict(r) for r in rows}


def test_a_current_accounts_card_shows_expired_once_its_month_has_ended_with_no_webhook(
        client, accounts, engine, worker, celery_app):
    account, customer = accounts.create()
    with freeze_time(EXPIRY - timedelta(days=3), tick=True):
        t = int((EXPIRY - timedelta(days=3)).timestamp())
        card = unique("pm")
        attached = event("payment_method.attached", id=card, customer=customer, created=t,
                         paths={"card.exp_month": 12, "card.exp_year": 2026})
        assert post_event(client, attached).status_code == 200
        default = event("customer.updated", id=customer, created=t + 1,
                        paths={"invoice_settings.default_payment_method": card})
        default["data"]["previous_attributes"] = {"invoice_settings": {"default_payment_method": None}}
        assert post_event(client, default).status_code == 200
        mandate = wait_for(lambda: (m := mandates(engine, account).get(card)) and m["is_default"] and m,
                           message="the card's mandate stored")
        assert mandate["status"] == "usable"
        state = dunning_row(engine, account)
        assert state["status"] == "current"
        # Nothing unpaid, no event to come: the card's expiry is when time alone changes the decision.
        assert state["next_review_at"] == EXPIRY

    # The month has ended; no webhook comes. Beat's re-drive finds the review due and recomputes.
    with freeze_time(EXPIRY + timedelta(seconds=30), tick=True):
        celery_app.send_task("tasks.redrive_requests")
        expired = wait_for(lambda: (m := mandates(engine, account)[card])["status"] == "expired" and m,
                           message="the review recomputed the account")
    assert expired["status_reason"] == "card expired 12/2026" and expired["exp_month"] == 12
    after = dunning_row(engine, account)
    assert after["status"] == "current" and after["next_review_at"] is None, after
    assert after["last_trigger"] == "STATE_REFRESH"
