"""An id too long for an index entry on the bad-debt outcome path is a 422, as it is elsewhere.

Found by review (third): a2958c5 made an id of kilobytes a 422 where ingest stores it, but a
payment_intent.canceled is mirrored as no row (webhooks/mirror.py), so its intent id reached only
the bad-debt outcome (app/payments/bad_debt_webhook.py), which names the payment's intent when the
webhook outran the API answer: the index on bad_debt_payment.stripe_payment_intent_id refused it, a
500 for every delivery of the event, three days of them."""

from __future__ import annotations

import time

from tests.conftest import post_event
from tests.integration.test_ingest_review import _long_id
from tests.integration.test_intent_canceled import cancelled_intent


def _pending_payment(engine, account: str) -> int:
    """A bad-debt payment in flight whose intent id the API answer has not stored yet."""
    with engine.begin() as conn:
        return int(conn.exec_driver_sql(
            "INSERT INTO bad_debt_payment (account_id, idempotency_key, request_fingerprint, amount) "
            "VALUES (%(a)s, %(k)s, 'f', 3000) RETURNING id", {"a": account, "k": f"key-{account}"}).scalar_one())


def test_the_cancellation_of_an_intent_whose_id_no_index_holds_is_a_422(client, engine, accounts):
    account, customer = accounts.create()
    payment = _pending_payment(engine, account)
    evt = cancelled_intent(customer, _long_id("pi_"), 3000, int(time.time()))
    evt["data"]["object"]["metadata"] = {"bad_debt_payment_id": str(payment)}
    response = post_event(client, evt)
    assert response.status_code == 422, response.data[:200]
    assert "too long" in response.json["reason"]
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM stripe_event").scalar_one() == 0
        row = conn.exec_driver_sql("SELECT state, stripe_payment_intent_id FROM bad_debt_payment WHERE id = %(i)s",
                                   {"i": payment}).one()
    assert (row.state, row.stripe_payment_intent_id) == ("pending", None)


def test_the_cancellation_of_its_intent_still_fails_the_payment(client, engine, accounts):
    account, customer = accounts.create()
    payment = _pending_payment(engine, account)
    evt = cancelled_intent(customer, "pi_3Rcanceled0001", 3000, int(time.time()))
    evt["data"]["object"]["metadata"] = {"bad_debt_payment_id": str(payment)}
    assert post_event(client, evt).status_code == 200
    with engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT state, stripe_payment_intent_id FROM bad_debt_payment WHERE id = %(i)s",
                                   {"i": payment}).one()
    assert (row.state, row.stripe_payment_intent_id) == ("failed", "pi_3Rcanceled0001")
