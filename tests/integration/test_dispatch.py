"""app/dispatch.py publishes what Celery's send_task publishes, in one batch, on the real broker."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import pytest
import redis
from celery import Celery

from app.config import Settings
from app.dispatch import SEND_RETRY_POLICY, BrokerUnavailable, send
from tasks import queues
from tasks.factory import make_celery
from tests.conftest import wait_for

# Per message; everything else must be equal.
PER_MESSAGE = {"delivery_tag"}


def _pop_envelope(client: redis.Redis, settings: Settings, queue: str) -> dict[str, Any]:
    raw = client.rpop(f"{settings.broker_key_prefix}{queue}")
    assert raw is not None, f"nothing on {queue}"
    assert isinstance(raw, bytes)
    envelope: dict[str, Any] = json.loads(raw)
    for name in PER_MESSAGE:
        envelope["properties"].pop(name)
    return envelope


@pytest.fixture
def broker(settings: Settings, celery_app: Celery, clean: None) -> redis.Redis:
    client = redis.Redis.from_url(settings.broker_url)
    client.delete(*(f"{settings.broker_key_prefix}{q}" for q in queues.ALL))
    return client


@pytest.mark.parametrize("name, args, kwargs, queue, ignore_result", [
    ("tasks.recompute_account", ["acct_1", "INVOICE_PAYMENT_FAILED", "evt_1"], {"coalesced": True},
     queues.RECOMPUTE, True),
    ("tasks.retry_payment", [42], {}, queues.PAYMENTS, True),
    ("tasks.recompute_account", ["acct_2", "NINJAPANEL_BUTTON", None], {"coalesced": False}, queues.RECOMPUTE, False),
    ("tasks.redrive_stuck", [], {}, queues.MAINTENANCE, True),
])
def test_the_message_is_the_one_send_task_publishes(settings, celery_app, broker, name, args, kwargs, queue,
                                                    ignore_result):
    ours = send(celery_app, name, args, kwargs, task_id="task-ours", ignore_result=ignore_result)
    celery_app.send_task(name, args=args, kwargs=kwargs, task_id="task-celery", ignore_result=ignore_result)
    assert ours == "task-ours"
    mine, theirs = _pop_envelope(broker, settings, queue), _pop_envelope(broker, settings, queue)
    assert mine["headers"]["id"] == "task-ours" and theirs["headers"]["id"] == "task-celery"
    for envelope in (mine, theirs):
        envelope["headers"]["id"] = envelope["headers"]["root_id"] = "task"
        envelope["properties"]["correlation_id"] = "task"
    assert mine["headers"] == theirs["headers"]
    assert mine == theirs
    assert mine["properties"]["delivery_info"] == {"exchange": "", "routing_key": queue}


def test_the_task_sent_event_reaches_event_consumers(settings, celery_app, broker):
    """What Flower listens to: a task-sent event with the task's id, name and queue."""
    pubsub = broker.pubsub()
    pubsub.psubscribe(f"{settings.broker_key_prefix}/*celeryev/task.sent")
    # The subscribe reply: only then is the subscription in place (an event sent before it is lost).
    # Before, a reply later than 5 s went unnoticed and the event could be sent too early.
    wait_for(lambda: pubsub.get_message(timeout=0.1), message="the psubscribe reply")
    send(celery_app, "tasks.recompute_account", ["acct_9", "STATE_REFRESH", None], task_id="task-evt")
    try:
        message = wait_for(lambda: pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5),
                           message="the task-sent event")
    finally:
        pubsub.close()
    envelope = json.loads(message["data"])
    body = json.loads(celery_app.connection_for_write().default_channel.decode_body(
        envelope["body"], envelope["properties"]["body_encoding"]))
    assert body["type"] == "task-sent" and body["uuid"] == "task-evt"
    assert body["name"] == "tasks.recompute_account" and body["queue"] == queues.RECOMPUTE
    assert body["args"] == repr(["acct_9", "STATE_REFRESH", None])


def test_a_celery_event_receiver_hears_the_task_sent_event(settings, celery_app, broker):
    """Flower and `celery events` listen through Celery's own event receiver, which kombu (5.4 and
    later) subscribes to the topic of the broker's database number (/0.celeryev/...). The lane
    published to kombu's prefix unformatted (/{db}.celeryev/...), which no receiver hears: Flower
    never showed a task a webhook or a re-drive sent until a worker took it."""
    heard: list[dict[str, Any]] = []
    receiver: Any = None
    listening = threading.Event()

    def listen() -> None:
        nonlocal receiver
        with celery_app.connection_for_read() as conn:
            receiver = celery_app.events.Receiver(conn, handlers={"task-sent": heard.append})
            listening.set()
            for _ in receiver.itercapture(timeout=60):
                pass

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert listening.wait(10)
    sent: set[str] = set()

    def sent_and_heard() -> bool:
        # Sent until one is heard: the receiver's subscription is in place only once it consumes.
        sent.add(send(celery_app, "tasks.recompute_account", ["acct_events", "STATE_REFRESH", None]))
        return any(event["uuid"] in sent for event in heard)

    try:
        wait_for(sent_and_heard, interval=0.5, message="a task-sent event heard by Celery's event receiver")
    finally:
        receiver.should_stop = True
        thread.join(10)
        broker.delete(f"{settings.broker_key_prefix}{queues.RECOMPUTE}")
    event = next(event for event in heard if event["uuid"] in sent)
    assert event["name"] == "tasks.recompute_account" and event["queue"] == queues.RECOMPUTE


def test_a_broker_that_is_down_is_reported_after_one_retry(settings):
    """A webhook waits on this: one retry (SEND_RETRY_POLICY), then BrokerUnavailable, not kombu's
    own reconnect loop. The "broker" accepts connections and drops them at once."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    attempts = 0

    def accept() -> None:
        nonlocal attempts
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            attempts += 1
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    down = make_celery(settings.with_overrides(broker_url=f"redis://127.0.0.1:{listener.getsockname()[1]}/0"))
    try:
        with pytest.raises(BrokerUnavailable, match=r"tasks\.recompute_account"):
            send(down, "tasks.recompute_account", ["acct_1", "STATE_REFRESH", None])
    finally:
        listener.close()
        thread.join(5)
    assert attempts == 1 + SEND_RETRY_POLICY["max_retries"]


def test_a_failover_list_of_redis_brokers_takes_celerys_own_path(settings):
    """kombu takes several brokers, ';'-separated, and fails over between them (app/config.py accepts
    such a list). redis-py reads the first address of it only, and no database number ('/1;redis://...'
    is no number: database 0): the lane put every task in a database no worker reads, answered
    "enqueued", and never failed over. Celery's own path publishes where the workers consume."""
    from urllib.parse import urlsplit

    first = urlsplit(settings.broker_url)._replace(path="/1").geturl()
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: the failover's second broker is down
    try:
        app = make_celery(settings.with_overrides(broker_url=f"{first};redis://127.0.0.1:{dead.getsockname()[1]}/1",
                                                  result_backend=settings.broker_url))
        task_id = send(app, "tasks.recompute_account", ["acct_failover", "STATE_REFRESH", None])
    finally:
        dead.close()
    queue = f"{settings.broker_key_prefix}{queues.RECOMPUTE}"
    client, db0 = redis.Redis.from_url(first), redis.Redis.from_url(urlsplit(first)._replace(path="/0").geturl())
    try:
        raw = client.rpop(queue)
        assert isinstance(raw, bytes), "nothing in the queue of the database the workers consume"
        assert json.loads(raw)["headers"]["id"] == task_id
    finally:
        client.delete(queue)
        db0.delete(queue)
        client.close()
        db0.close()


def test_other_brokers_take_celerys_own_path(settings):
    """Not the product's broker, but a supported one: send() must still deliver there. kombu's
    in-memory transport, like RabbitMQ's, has no publish batch, so it takes the same path."""
    app = make_celery(settings.with_overrides(broker_url="memory://"))
    queue = f"dunning-test-{time.monotonic_ns()}"
    app.conf.task_routes = {"tasks.recompute_account": {"queue": queue}}
    with app.connection_for_write() as conn:
        simple = conn.SimpleQueue(queue)
        try:
            task_id = send(app, "tasks.recompute_account", ["acct_7", "STATE_REFRESH", None])
            message = simple.get(timeout=5)
            message.ack()
            assert message.headers["id"] == task_id and message.headers["task"] == "tasks.recompute_account"
            assert message.decode()[0] == ["acct_7", "STATE_REFRESH", None]
        finally:
            simple.close()
