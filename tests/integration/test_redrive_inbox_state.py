"""The inbox state of an event whose recompute the broker did not take at ingest (enqueue_failed)
says whether it still waits for one: beat's re-drive clears it once the account's request is gone."""

from __future__ import annotations

from sqlalchemy import Engine

from app.recompute.service import run_recompute
from app.redrive import redrive
from tests.conftest import Accounts, post_event
from tests.stripe_events import event, unique


def _state(engine: Engine, event_id: str) -> str:
    with engine.connect() as conn:
        return str(conn.exec_driver_sql("SELECT state FROM stripe_event WHERE id = %(i)s", {"i": event_id})
                   .scalar_one())


def test_an_event_whose_request_another_run_took_no_longer_shows_waiting_for_its_recompute(
        settings, runtime, celery_app, accounts: Accounts, engine: Engine) -> None:
    """Only the re-drive that queued the account's request marked its enqueue_failed events accepted.
    A run that took the request first (the support button, a retry of an earlier failed recompute)
    did the events' work, the re-drive then had nothing to queue for the account, and the events
    showed enqueue_failed, waiting for a recompute, for ever."""
    from app import create_app
    from tasks.factory import make_celery

    dead_broker = make_celery(settings.with_overrides(broker_url="redis://127.0.0.1:1/0"))
    app = create_app(settings, runtime=runtime, celery=dead_broker)
    account, customer = accounts.create()
    evt = event("invoice.payment_failed", id=unique("in"), customer=customer)
    assert post_event(app.test_client(), evt).json["state"] == "enqueue_failed"
    other = event("invoice.payment_failed", id=unique("in"), customer=accounts.create()[1])  # its request stays
    assert post_event(app.test_client(), other).json["state"] == "enqueue_failed"

    result = run_recompute(engine, runtime.policy, account, "NINJAPANEL_BUTTON")  # takes the request
    assert result.decision is not None and result.decision.state.status == "past_due"  # the event's work is done

    report = redrive(engine, celery_app)  # the other request is not stale yet: nothing is queued
    assert report["sent"] == 0
    assert _state(engine, evt["id"]) == "accepted"
    assert _state(engine, other["id"]) == "enqueue_failed"  # still waiting: its request is pending


def test_an_event_the_re_drive_routed_shows_its_recompute_not_queued_while_the_broker_is_down(
        settings, client, celery_app, accounts: Accounts, engine: Engine) -> None:
    """Routing marked an unroutable event accepted before its recompute was sent: with the broker
    down it showed accepted (queued) while its account's request waited for the stale-request
    re-drive, unlike an event ingest could not enqueue (enqueue_failed). It now shows enqueue_failed
    until a re-drive queues the request."""
    from tasks.factory import make_celery

    dead_broker = make_celery(settings.with_overrides(broker_url="redis://127.0.0.1:1/0"))
    customer = unique("cus")
    evt = event("invoice.payment_failed", id=unique("in"), customer=customer)
    assert post_event(client, evt).json["state"] == "unroutable"
    accounts.create(customer=customer)

    report = redrive(engine, dead_broker)
    assert report["routed"] == 1 and report["failed"] == 1
    assert _state(engine, evt["id"]) == "enqueue_failed"

    report = redrive(engine, celery_app, stale_after_seconds=0)  # the broker back: the request is sent
    assert report["sent"] == 1
    assert _state(engine, evt["id"]) == "accepted"
