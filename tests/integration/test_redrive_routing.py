"""Beat's re-drive of events whose customer had no account when they arrived (app/redrive.py), under
load: another team maps many customers at once (a migration, a bulk import into subs_customer)."""

from __future__ import annotations

from sqlalchemy import Engine

from app.redrive import redrive
from tests.conftest import Accounts, post_event
from tests.integration.test_webhook_ingest import count, failed_invoice, queued
from tests.stripe_events import unique


def test_the_unroutable_re_drive_routes_at_most_its_limit_per_tick_and_loses_none(
        client, accounts: Accounts, engine: Engine, settings, celery_app) -> None:
    """The routing step took every routable event in one transaction, a request round trip per event,
    before the stale requests and due reviews of the same tick: a bulk mapping made one tick as long
    as the backlog (request rows of every account locked until it committed, ingest for them waiting
    on them), and one past the task's hard time limit rolled back and came back the same on every
    tick, holding up the whole re-drive. It now routes at most ``limit`` events a tick, one request
    per account; the others are routed by the next ticks."""
    customers = [unique("cus") for _ in range(3)]
    for customer in (customers[0], *customers):  # the first customer's two events, one each for the others
        response = post_event(client, failed_invoice(customer))
        assert response.status_code == 200 and response.json["state"] == "unroutable"
    assert count(engine, "SELECT count(*) FROM stripe_event WHERE state = 'unroutable'") == 4
    owners = {customer: accounts.create(customer=customer)[0] for customer in customers}  # mapped at once

    assert redrive(engine, celery_app, limit=2)["routed"] == 2
    assert count(engine, "SELECT count(*) FROM stripe_event WHERE state = 'unroutable'") == 2
    assert redrive(engine, celery_app, limit=2)["routed"] == 2
    assert redrive(engine, celery_app, limit=2)["routed"] == 0

    for customer, account in owners.items():  # every event routed to its customer's account
        assert count(engine, "SELECT count(*) FROM stripe_event WHERE stripe_customer_id = %(c)s "
                             "AND (state <> 'accepted' OR account_id IS DISTINCT FROM %(a)s)",
                     c=customer, a=account) == 0
    assert count(engine, "SELECT count(*) FROM recompute_request") == 3  # one pending recompute per account
    assert queued(settings) == 3  # and one message each
