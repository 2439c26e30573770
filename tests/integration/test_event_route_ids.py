"""Migration event_route_ids: the events stored unroutable before it are given the invoice and the
payment intent their bodies name, so that beat's re-drive routes those whose invoice or intent the
mirror has filed under an account since (app/redrive.py route_unroutable)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine

from app.migrate import downgrade, upgrade
from app.redrive import route_unroutable
from tests.integration.test_bad_debt_dispute import dispute_event
from tests.stripe_events import event, unique
from webhooks import store
from webhooks.mirror import extract

REVISION_BEFORE = "rollout_revision"  # before event_route_ids


@pytest.fixture
def before(empty_database: str) -> Iterator[tuple[str, Engine]]:
    upgrade(empty_database)
    downgrade(empty_database, REVISION_BEFORE)
    engine = create_engine(empty_database)
    try:
        yield empty_database, engine
    finally:
        engine.dispose()


def _stored_unroutable(engine: Engine, evt: dict[str, Any]) -> str:
    """As the previous release stored an event it could not route: no customer, no route."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO stripe_event (id, type, stripe_created, stripe_customer_id, account_id, trigger, state, "
            "raw_body) VALUES (%(id)s, %(type)s, %(created)s, NULL, NULL, 'STATE_REFRESH', 'unroutable', %(raw)s)",
            {"id": evt["id"], "type": evt["type"], "created": evt["created"], "raw": json.dumps(evt)})
    return str(evt["id"])


def test_the_events_stored_unroutable_before_are_routed_once_their_invoice_or_intent_is_known(
        before: tuple[str, Engine]) -> None:
    url, engine = before
    invoice_id, intent, disputed = unique("in"), unique("pi"), unique("pi")
    link = _stored_unroutable(engine, event("invoice_payment.paid", invoice=invoice_id,
                                            paths={"payment.payment_intent": intent}))
    dispute = _stored_unroutable(engine, dispute_event(disputed, unique("ch"), 1000))
    unreadable = _stored_unroutable(engine, {"id": unique("evt"), "type": "invoice_payment.paid", "created": 1,
                                             "data": "not an object"})
    upgrade(url)
    with engine.connect() as conn:
        routes = {r[0]: (r[1], r[2]) for r in conn.exec_driver_sql(
            "SELECT id, route_invoice_id, route_payment_intent_id FROM stripe_event").all()}
    assert routes == {link: (invoice_id, intent), dispute: (None, disputed), unreadable: (None, None)}

    with engine.begin() as conn:  # the invoice mirrored since, under a customer another team maps
        conn.exec_driver_sql("INSERT INTO subs_account (account_id) VALUES ('acct_route')")
        conn.exec_driver_sql("INSERT INTO subs_customer (stripe_customer_id, account_id) VALUES ('cus_route', "
                             "'acct_route')")
        paid = event("invoice.paid", id=invoice_id, customer="cus_route")
        store.ingest_events(conn, [(extract(paid), json.dumps(paid))])
        routed = route_unroutable(conn, 10)
    assert [(account, event_id) for account, _trigger, event_id in routed] == [("acct_route", link)]
