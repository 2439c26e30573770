"""POST /webhooks/stripe through the Flask app, on the real database and broker."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import redis
from freezegun import freeze_time
from sqlalchemy import Engine

from app import metrics
from app.config import Settings
from tests.conftest import WEBHOOK_SECRET, Accounts, post_event
from tests.stripe_events import event, sign, unique

DAY = 86400


def queued(settings: Settings, queue: str = "recompute") -> int:
    client = redis.Redis.from_url(settings.broker_url)
    try:
        return int(client.llen(f"{settings.broker_key_prefix}{queue}"))
    finally:
        client.close()


def count(engine: Engine, sql: str, **params: Any) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(sql, params).scalar_one())


def failed_invoice(customer: str, invoice_id: str | None = None, **kw: Any) -> dict[str, Any]:
    return event("invoice.payment_failed", id=invoice_id or unique("in"), customer=customer, **kw)


def test_signed_event_is_stored_mirrored_and_enqueued(client, accounts: Accounts, engine, settings):
    account, customer = accounts.create()
    evt = failed_invoice(customer)
    response = post_event(client, evt)
    assert response.status_code == 200, response.json
    assert response.json["state"] == "accepted" and response.json["enqueued"] is True
    with engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT account_id, state, raw_body FROM stripe_event WHERE id = %(i)s",
                                   {"i": evt["id"]}).one()
        invoice = conn.exec_driver_sql("SELECT status, stripe_customer_id, first_failed_at FROM stripe_invoice "
                                       "WHERE id = %(i)s", {"i": evt["data"]["object"]["id"]}).one()
    assert row.account_id == account and row.state == "accepted"
    assert json.loads(row.raw_body) == evt  # raw body kept
    assert invoice.status == "open" and invoice.stripe_customer_id == customer
    assert invoice.first_failed_at is not None
    assert count(engine, "SELECT count(*) FROM recompute_request WHERE account_id = %(a)s", a=account) == 1
    assert queued(settings) == 1


def _assert_rejected(response, engine, settings, reason_part: str) -> None:
    assert response.status_code == 400
    assert reason_part in response.json["reason"]
    assert count(engine, "SELECT count(*) FROM stripe_event") == 0
    assert count(engine, "SELECT count(*) FROM stripe_invoice") == 0
    assert queued(settings) == 0


def test_missing_signature_is_rejected(client, accounts, engine, settings):
    _, customer = accounts.create()
    response = client.post("/webhooks/stripe", data=json.dumps(failed_invoice(customer)))
    _assert_rejected(response, engine, settings, "missing Stripe-Signature")


def test_wrong_signature_is_rejected(client, accounts, engine, settings):
    _, customer = accounts.create()
    response = post_event(client, failed_invoice(customer), secret="whsec_not_ours")
    _assert_rejected(response, engine, settings, "does not match")


def test_tampered_body_is_rejected(client, accounts, engine, settings):
    _, customer = accounts.create()
    evt = failed_invoice(customer)
    body = json.dumps(evt)
    header = sign(body, WEBHOOK_SECRET)
    response = client.post("/webhooks/stripe", data=body.replace('"open"', '"paid"'),
                           headers={"Stripe-Signature": header})
    _assert_rejected(response, engine, settings, "does not match")


def test_timestamp_outside_tolerance_is_rejected(client, accounts, engine, settings):
    _, customer = accounts.create()
    response = post_event(client, failed_invoice(customer), timestamp=int(time.time()) - 301)
    _assert_rejected(response, engine, settings, "tolerance")


def test_timestamp_tolerance_follows_the_clock(client, accounts, engine, settings):
    _, customer = accounts.create()
    signed_at = int(time.time())
    with freeze_time(time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(signed_at + 299))):
        assert post_event(client, failed_invoice(customer), timestamp=signed_at).status_code == 200
    with freeze_time(time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(signed_at + 302))):
        assert post_event(client, failed_invoice(customer), timestamp=signed_at).status_code == 400


def test_malformed_signature_header_is_rejected(client, accounts, engine, settings):
    _, customer = accounts.create()
    response = client.post("/webhooks/stripe", data=json.dumps(failed_invoice(customer)),
                           headers={"Stripe-Signature": "garbage"})
    _assert_rejected(response, engine, settings, "malformed")


def test_a_non_ascii_signature_is_malformed_not_a_500(client, accounts, engine, settings):
    # stripe's secure_compare hands each v1 value to hmac.compare_digest, which raises TypeError on a
    # str with non-ASCII characters: the public endpoint answered 500 to anyone who sent one.
    _, customer = accounts.create()
    body = json.dumps(failed_invoice(customer))
    rejected = metrics.WEBHOOKS_REJECTED.labels("malformed")
    before = rejected._value.get()
    for header in (f"t={int(time.time())},v1=\u00e9", sign(body, WEBHOOK_SECRET) + "\u00e9"):
        response = client.post("/webhooks/stripe", data=body, headers={"Stripe-Signature": header})
        _assert_rejected(response, engine, settings, "malformed")
    assert rejected._value.get() == before + 2


def test_a_signed_body_nested_too_deeply_is_rejected_not_a_500(client, accounts, engine, settings):
    # orjson refuses more than 1024 levels and json.loads, tried next, ran out of stack: RecursionError.
    _, customer = accounts.create()
    text = json.dumps(failed_invoice(customer))
    for body in ("[" * 100_000 + "]" * 100_000, text[:-1] + ', "extra": ' + "[" * 100_000 + "]" * 100_000 + "}"):
        response = client.post("/webhooks/stripe", data=body, headers={"Stripe-Signature": sign(body, WEBHOOK_SECRET)})
        _assert_rejected(response, engine, settings, "nested too deeply")


def test_signed_body_that_is_not_json_is_rejected(client, engine, settings, clean):
    body = "this is not json"
    response = client.post("/webhooks/stripe", data=body, headers={"Stripe-Signature": sign(body, WEBHOOK_SECRET)})
    _assert_rejected(response, engine, settings, "not JSON")


def test_signed_json_that_is_not_a_stripe_event_is_rejected(client, engine, settings, clean):
    for body, reason in [
        (json.dumps({"hello": "world"}), "not a Stripe event"),
        (json.dumps([1, 2]), "not a Stripe event"),
        (json.dumps({"object": "event", "id": "evt_1", "type": "invoice.paid", "created": 1}), "data.object"),
        (json.dumps({"object": "event", "type": "invoice.paid", "created": 1, "data": {"object": {}}}), "no id"),
    ]:
        response = client.post("/webhooks/stripe", data=body, headers={"Stripe-Signature": sign(body, WEBHOOK_SECRET)})
        _assert_rejected(response, engine, settings, reason)


def test_duplicate_delivery_does_nothing_new(client, accounts, engine, settings):
    _, customer = accounts.create()
    evt = failed_invoice(customer)
    assert post_event(client, evt).json["state"] == "accepted"
    again = post_event(client, evt)
    assert again.status_code == 200 and again.json["state"] == "duplicate"
    assert count(engine, "SELECT count(*) FROM stripe_event") == 1
    assert queued(settings) == 1


def test_unknown_event_type_is_stored_and_acknowledged_without_recompute(client, accounts, engine, settings):
    _, customer = accounts.create()
    evt = event("customer.updated", id=customer)
    evt["type"] = "customer.tax_id.created"  # a type this product does not act on
    response = post_event(client, evt)
    assert response.status_code == 200 and response.json["state"] == "ignored"
    assert count(engine, "SELECT count(*) FROM stripe_event WHERE state = 'ignored'") == 1
    assert count(engine, "SELECT count(*) FROM recompute_request") == 0
    assert queued(settings) == 0


def test_burst_for_one_account_queues_one_recompute(client, accounts, engine, settings):
    account, customer = accounts.create()
    for _ in range(5):
        assert post_event(client, failed_invoice(customer)).status_code == 200
    assert queued(settings) == 1
    # The recompute takes the pending request; the next change queues exactly one more.
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM recompute_request WHERE account_id = %(a)s", {"a": account})
    for _ in range(3):
        post_event(client, failed_invoice(customer))
    assert queued(settings) == 2


def test_older_event_never_overwrites_newer_data(client, accounts, engine):
    _, customer = accounts.create()
    invoice_id = unique("in")
    now = int(time.time())
    paid = event("invoice.paid", id=invoice_id, customer=customer, created=now)
    failed = event("invoice.payment_failed", id=invoice_id, customer=customer, created=now - 60)
    post_event(client, paid)
    post_event(client, failed)  # arrives late, describes an older state
    with engine.connect() as conn:
        status, first_failed = conn.exec_driver_sql(
            "SELECT status, first_failed_at FROM stripe_invoice WHERE id = %(i)s", {"i": invoice_id}).one()
    assert status == "paid"
    assert first_failed is not None  # the failure itself is still a fact worth keeping


def test_only_a_change_of_the_default_method_dates_one(client, accounts, engine):
    """customer.updated comes for any change (here the fixture's own: metadata only; Stripe also sends
    one when it marks a customer delinquent after a failed payment). Compute reads the date as "default
    method changed", which earns an immediate retry, so only an event that names it may set it."""
    _, customer = accounts.create()
    now = int(time.time())

    def customer_state() -> tuple[Any, Any]:
        with engine.connect() as conn:
            return conn.exec_driver_sql("SELECT default_payment_method_id, changed_at FROM stripe_customer_state "
                                        "WHERE stripe_customer_id = %(c)s", {"c": customer}).one()

    def updated(created: int, pm: str, previous: dict[str, Any]) -> dict[str, Any]:
        evt = event("customer.updated", id=customer, created=created,
                    paths={"invoice_settings.default_payment_method": pm})
        evt["data"]["previous_attributes"] = previous
        return evt

    assert post_event(client, updated(now - 300, "pm_1", {"metadata": {}})).status_code == 200
    assert customer_state() == ("pm_1", None)
    changed = updated(now - 200, "pm_2", {"invoice_settings": {"default_payment_method": "pm_1"}})
    post_event(client, changed)
    post_event(client, updated(now - 100, "pm_2", {"metadata": {}}))
    assert customer_state() == ("pm_2", datetime.fromtimestamp(now - 200, UTC))
    # An older change arriving late moves neither the method nor the date back.
    post_event(client, updated(now - 250, "pm_1", {"invoice_settings": {"default_payment_method": None}}))
    assert customer_state() == ("pm_2", datetime.fromtimestamp(now - 200, UTC))


def retyped(event_type: str, base: str, **status: Any) -> dict[str, Any]:
    """An event type the fixtures do not hold, as Stripe sends it: the same object in another state
    (``base`` is the fixture's type; ``status`` sets data.object keys the fixture has)."""
    evt = event(base, **status)
    evt["type"] = event_type
    return evt


def attempt_row(engine: Engine, key: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.exec_driver_sql("SELECT * FROM stripe_payment_attempt WHERE id = %(k)s",
                                         {"k": key}).mappings().one())


def test_every_attempt_on_one_payment_intent_moves_its_rows_time(client, accounts, engine):
    """Stripe confirms an invoice's payment intent again for every retry: one mirror row, and its
    time must be the latest attempt's (the guard window, a card changed since, our own retry's
    outcome all compare with it), with the latest attempt's outcome."""
    _, customer = accounts.create()
    intent, now = unique("pi"), int(time.time())
    first = event("charge.failed", id=unique("ch"), customer=customer, payment_intent=intent, created=now - 25 * 86400,
                  paths={"created": now - 25 * 86400, "outcome.reason": "insufficient_funds"})
    retried = event("charge.failed", id=unique("ch"), customer=customer, payment_intent=intent, created=now - 60,
                    paths={"created": now - 60, "outcome.reason": "lost_card"})
    post_event(client, retried)
    post_event(client, first)  # delivered late: neither its time nor its outcome wins
    row = attempt_row(engine, intent)
    assert row["attempted_at"] == datetime.fromtimestamp(now - 60, UTC) and row["decline_code"] == "lost_card"
    succeeded = retyped("payment_intent.succeeded", "payment_intent.payment_failed", id=intent, customer=customer,
                        status="succeeded", last_payment_error=None)
    succeeded["created"] = now
    post_event(client, succeeded)
    row = attempt_row(engine, intent)
    assert (row["status"], row["attempted_at"]) == ("succeeded", datetime.fromtimestamp(now, UTC))


def test_the_next_charge_on_an_intent_does_not_inherit_the_previous_ones_advice(client, accounts, engine):
    """An expired card with advice do_not_try_again, then a new card whose charge on the same intent
    fails with insufficient_funds and no advice: the row must say the latter, or compute reads the
    new card's failure as permanent and never retries it."""
    _, customer = accounts.create()
    intent, now = unique("pi"), int(time.time())
    first = event("charge.failed", id=unique("ch"), customer=customer, payment_intent=intent, created=now - 3600,
                  paths={"created": now - 3600, "outcome.reason": "expired_card",
                         "outcome.advice_code": "do_not_try_again"})
    second = event("charge.failed", id=unique("ch"), customer=customer, payment_intent=intent, created=now - 60,
                   paths={"created": now - 60, "outcome.reason": "insufficient_funds"})
    post_event(client, first)
    post_event(client, second)
    row = attempt_row(engine, intent)
    assert (row["charge_id"], row["decline_code"], row["advice_code"]) == (
        second["data"]["object"]["id"], "insufficient_funds", None)
    # the older charge's event delivered again, late: it fills nothing of the newer one's
    again = json.loads(json.dumps(first))
    again["id"] = unique("evt")
    post_event(client, again)
    row = attempt_row(engine, intent)
    assert (row["charge_id"], row["decline_code"], row["advice_code"]) == (
        second["data"]["object"]["id"], "insufficient_funds", None)
    # the intent's own event about that same charge fills in, it does not erase
    same = retyped("payment_intent.payment_failed", "payment_intent.payment_failed", id=intent, customer=customer,
                   latest_charge=second["data"]["object"]["id"])
    same["created"] = now
    post_event(client, same)
    assert attempt_row(engine, intent)["decline_code"] is not None


def test_every_charge_on_a_reused_intent_is_kept_whatever_the_order(client, accounts, engine):
    """The card networks' cap counts charges: an invoice's intent confirmed again for each retry
    must keep each of its charges, with its method and time, however Stripe orders the events."""
    now = int(time.time())

    def history(customer: str, intent: str) -> list[dict[str, Any]]:
        events = []
        for k in range(5):
            charge, at, card = unique("ch"), now - (5 - k) * DAY, "pm_new" if k == 4 else "pm_old"
            events.append(event("charge.failed", id=charge, customer=customer, payment_intent=intent, created=at,
                                payment_method=card, paths={"created": at}))
            # the intent's event names the charge (and its card) but not the charge's time
            events.append(retyped("payment_intent.payment_failed", "payment_intent.payment_failed", id=intent,
                                  customer=customer, latest_charge=charge,
                                  paths={"last_payment_error.payment_method": {"id": card},
                                         "last_payment_error.charge": charge}))
            events[-1]["created"] = at + 30
        return events

    for order in (lambda e: e, lambda e: e[::-1]):
        _, customer = accounts.create()
        intent = unique("pi")
        events = history(customer, intent)
        for evt in order(events):
            assert post_event(client, evt).status_code == 200
        expected = {e["data"]["object"]["id"]: {"pm": e["data"]["object"]["payment_method"],
                                                "at": e["data"]["object"]["created"]}
                    for e in events if e["type"] == "charge.failed"}
        assert attempt_row(engine, intent)["charges"] == expected


def test_an_intent_waiting_on_a_new_card_does_not_move_the_old_cards_charge(client, accounts, engine):
    """The customer picks a new card that needs 3-D Secure: the intent names the new card, and still
    its latest charge, made on the old one. That charge counts against the old card's cap."""
    _, customer = accounts.create()
    intent, charge, now = unique("pi"), unique("ch"), int(time.time())
    declined = event("charge.failed", id=charge, customer=customer, payment_intent=intent, created=now - 60,
                     payment_method="pm_a_old", paths={"created": now - 60})
    waiting = retyped("payment_intent.requires_action", "payment_intent.payment_failed", id=intent,
                      customer=customer, latest_charge=charge, payment_method="pm_z_new", status="requires_action",
                      last_payment_error=None)
    for order in ((declined, waiting), (waiting, declined)):
        for evt in order:
            evt = json.loads(json.dumps(evt))
            evt["id"] = unique("evt")
            assert post_event(client, evt).status_code == 200
        assert attempt_row(engine, intent)["charges"] == {charge: {"pm": "pm_a_old", "at": now - 60}}


def test_a_failed_authentication_on_a_new_card_adds_no_charge(client, accounts, engine):
    """3-D Secure failed on the new card: the intent's error names that card, and no charge (the
    intent's latest charge is still the old card's). Nothing moves to the new card's count."""
    _, customer = accounts.create()
    intent, charge, now = unique("pi"), unique("ch"), int(time.time())
    declined = event("charge.failed", id=charge, customer=customer, payment_intent=intent, created=now - 60,
                     payment_method="pm_a_old", paths={"created": now - 60})
    authentication = retyped("payment_intent.payment_failed", "payment_intent.payment_failed", id=intent,
                             customer=customer, latest_charge=charge, payment_method=None,
                             paths={"last_payment_error.payment_method": {"id": "pm_z_new"},
                                    "last_payment_error.code": "payment_intent_authentication_failure"})
    for evt in (declined, authentication):
        assert post_event(client, evt).status_code == 200
    assert attempt_row(engine, intent)["charges"] == {charge: {"pm": "pm_a_old", "at": now - 60}}


def test_a_payment_method_update_of_metadata_alone_is_no_change(client, accounts, engine):
    """An update that earns an immediate retry changes the card (its expiry, its billing details);
    one that touched only metadata must not retry the card just declined."""
    _, customer = accounts.create()
    pm, now = unique("pm"), int(time.time())
    post_event(client, event("payment_method.attached", id=pm, customer=customer, created=now - 30 * DAY))

    def changed_at() -> datetime:
        with engine.connect() as conn:
            return conn.exec_driver_sql("SELECT changed_at FROM stripe_payment_method WHERE id = %(p)s",
                                        {"p": pm}).scalar_one()

    def updated(created: int, previous: dict[str, Any]) -> dict[str, Any]:
        evt = retyped("payment_method.updated", "payment_method.attached", id=pm, customer=customer)
        evt["created"], evt["data"]["previous_attributes"] = created, previous
        return evt

    post_event(client, updated(now - 120, {"metadata": {}}))
    assert changed_at() == datetime.fromtimestamp(now - 30 * DAY, UTC)
    post_event(client, updated(now - 60, {"card": {"exp_year": 2025}}))  # the customer renewed the expiry
    assert changed_at() == datetime.fromtimestamp(now - 60, UTC)


def _attached_then_detached_naming_no_customer(client: Any, customer: str) -> tuple[str, dict[str, Any]]:
    """A card attached to ``customer`` 30 days ago (posted), and its payment_method.detached of a
    minute ago (not posted) as Stripe may send it: customer null, no previous_attributes."""
    pm, now = unique("pm"), int(time.time())
    post_event(client, event("payment_method.attached", id=pm, customer=customer, created=now - 30 * DAY))
    detached = retyped("payment_method.detached", "payment_method.attached", id=pm, customer=None)
    detached["created"] = now - 60
    detached["data"].pop("previous_attributes", None)
    return pm, detached


def test_a_detached_card_stays_its_customers_when_the_event_does_not_say_whose_it_was(client, accounts, engine):
    """payment_method.detached carries the object with customer null; previous_attributes may name
    the customer or be absent (Stripe documents them for *.updated events). Absent, the newer row
    erased the card's customer: the card left the account's mirror, and compute, no longer knowing
    it as detached, planned retries on it. The customer a row knows is kept when an event names none."""
    _, customer = accounts.create()
    pm, detached = _attached_then_detached_naming_no_customer(client, customer)
    assert post_event(client, detached).status_code == 200
    with engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT stripe_customer_id, attached FROM stripe_payment_method WHERE id = %(p)s",
                                   {"p": pm}).one()
    assert tuple(row) == (customer, False)


def test_a_detached_card_whose_event_names_no_customer_recomputes_the_account_it_was_on(client, accounts, engine):
    """The same event (customer null, no previous_attributes) must also reach the account: routed by
    the event's customer only, it was stored unroutable, no recompute was requested (the dunning
    state kept planning retries on the removed card), and it was never re-driven (the re-drive looks
    unroutable events up by a customer it did not have). The customer the card's row knows routes it."""
    account, customer = accounts.create()
    _, detached = _attached_then_detached_naming_no_customer(client, customer)
    response = post_event(client, detached)
    assert response.status_code == 200
    assert (response.json["state"], response.json["account_id"]) == ("accepted", account)
    with engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT state, account_id, stripe_customer_id FROM stripe_event WHERE id = %(e)s",
                                      {"e": detached["id"]}).one()
    assert tuple(stored) == ("accepted", account, customer)


def test_an_attempt_in_flight_and_a_new_subscription_are_mirrored_and_recomputed(client, accounts, engine):
    """Retries and bad debt wait for an attempt without outcome, which only works if the mirror
    knows of it; and a subscription active from its creation is in the entitlements at once."""
    _, customer = accounts.create()
    intent = unique("pi")
    processing = retyped("payment_intent.processing", "payment_intent.payment_failed", id=intent, customer=customer,
                         status="processing", last_payment_error=None)
    response = post_event(client, processing)
    assert response.status_code == 200 and response.json["state"] == "accepted"
    assert attempt_row(engine, intent)["status"] == "pending"
    pending = retyped("charge.pending", "charge.failed", id=unique("ch"), customer=customer,
                      payment_intent=unique("pi"), status="pending")
    assert post_event(client, pending).json["state"] == "accepted"
    created = retyped("customer.subscription.created", "customer.subscription.updated", id=unique("sub"),
                      customer=customer)
    assert post_event(client, created).json["state"] == "accepted"
    assert count(engine, "SELECT count(*) FROM stripe_subscription WHERE id = %(s)s",
                 s=created["data"]["object"]["id"]) == 1


def test_unknown_customer_is_kept_visible_and_redriven_when_mapped(client, accounts, engine, settings, celery_app):
    from app.redrive import redrive

    customer = unique("cus")
    evt = failed_invoice(customer)
    response = post_event(client, evt)
    assert response.status_code == 200 and response.json["state"] == "unroutable"
    assert count(engine, "SELECT count(*) FROM stripe_event WHERE state = 'unroutable'") == 1
    assert queued(settings) == 0
    assert redrive(engine, celery_app)["routed"] == 0  # still nobody to route to

    account, _ = accounts.create(customer=customer)
    result = redrive(engine, celery_app)
    assert result["routed"] == 1 and result["sent"] == 1
    assert count(engine, "SELECT count(*) FROM stripe_event WHERE state = 'accepted' AND account_id = %(a)s",
                 a=account) == 1
    assert queued(settings) == 1


def test_database_unreachable_answers_503(settings, celery_app, clean):
    from app import create_app
    from app.runtime import Runtime

    down = settings.with_overrides(database_url="postgresql+psycopg2://postgres@127.0.0.1:1/nothing")
    app = create_app(down, runtime=Runtime.build(down), celery=celery_app)
    response = post_event(app.test_client(), failed_invoice(unique("cus")))
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert "database" in response.json["reason"]


def test_no_database_connection_free_in_time_answers_503(settings, celery_app, accounts):
    """More requests at once than the pool has connections (a gevent worker serves many): the one
    left waiting past the pool's timeout is told to retry, not given a 500."""
    from app import create_app
    from app.db import make_engine
    from app.runtime import Runtime
    from tests.conftest import service_headers

    runtime = Runtime.build(settings)
    runtime.engine = make_engine(settings.database_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    app = create_app(settings, runtime=runtime, celery=celery_app)
    account, _customer = accounts.create()
    with runtime.engine.connect():  # the pool's only connection, busy
        response = app.test_client().get(f"/accounts/{account}/dunning", headers=service_headers())
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json is not None
    assert "busy" in response.json["reason"]
    assert app.test_client().get(f"/accounts/{account}/dunning", headers=service_headers()).status_code == 200
    runtime.engine.dispose()
