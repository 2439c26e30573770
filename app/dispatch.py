"""Putting work on the queues. Everything that enqueues goes through here.

On Redis (the product's broker) a task leaves as Celery's ``send_task`` would send it: the message
built by Celery (``app.amqp.create_task_message``), routed by the app's task routes, prepared by the
kombu channel, followed by its task-sent event for Flower. What differs is the cost: both messages
go out in one kombu publish batch (one pipelined round trip), and the generic machinery of
``send_task`` and ``Producer.publish`` (option merging, retry wrappers, signals, ``saferepr``) is
skipped. On the webhook path that machinery cost more CPU than the database work (bench/ingest.py,
README "Measured"). tests/integration/test_dispatch.py holds the two paths' messages equal.
Other brokers take Celery's own path.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.events import EventDispatcher
from kombu.exceptions import BatchPublishError
from kombu.serialization import dumps
from kombu.utils.uuid import uuid


class BrokerUnavailable(Exception):
    """The broker did not take the message."""


# Ingest must answer fast: when the broker is down, give up quickly; beat re-drives the request.
SEND_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
# The connection is made within the policy above; the pipelined write at the end of a batch is not
# retried by kombu, so a failed one is tried once more here: the pool replaces a connection the
# broker dropped (a restart). A batch that failed half-way may then deliver a message twice, which
# every task here tolerates (recompute is idempotent, payments carry idempotency keys).
FLUSH_ATTEMPTS = 2


def send(celery_app: Celery, name: str, args: list[Any] | None = None, kwargs: dict[str, Any] | None = None,
         *, task_id: str | None = None, ignore_result: bool = True) -> str:
    """Publish task ``name`` and its task-sent event; the task id. Raises BrokerUnavailable."""
    args, kwargs = list(args or []), dict(kwargs or {})
    task_id = task_id or uuid()
    for attempt in range(1, FLUSH_ATTEMPTS + 1):
        try:
            _publish(celery_app, name, args, kwargs, task_id, ignore_result)
            return task_id
        except BatchPublishError as exc:
            if attempt == FLUSH_ATTEMPTS:
                raise BrokerUnavailable(f"broker did not accept {name}: {type(exc.__cause__).__name__}") from exc
        except Exception as exc:  # kombu raises several types (OperationalError, ConnectionError, ...)
            raise BrokerUnavailable(f"broker did not accept {name}: {exc.__class__.__name__}") from exc
    raise AssertionError("unreachable")


def _publish(celery_app: Celery, name: str, args: list[Any], kwargs: dict[str, Any], task_id: str,
             ignore_result: bool) -> None:
    with celery_app.producer_or_acquire() as producer:
        # Connect (if the pooled connection is not) within the send policy: kombu's own default
        # keeps retrying for the broker connection timeout, seconds that a webhook cannot wait.
        producer.connection.ensure_connection(
            max_retries=SEND_RETRY_POLICY["max_retries"], interval_start=SEND_RETRY_POLICY["interval_start"],
            interval_step=SEND_RETRY_POLICY["interval_step"], interval_max=SEND_RETRY_POLICY["interval_max"])
        channel = producer.channel
        if not callable(getattr(channel, "create_publish_batch", None)):  # not Redis: Celery's own path
            celery_app.send_task(name, args=args, kwargs=kwargs, task_id=task_id, ignore_result=ignore_result,
                                 producer=producer, retry=True, retry_policy=SEND_RETRY_POLICY)
            return
        queue, task, sent = _task_message(celery_app, channel, name, args, kwargs, task_id, ignore_result)
        events = _dispatcher(celery_app)
        producer.maybe_declare(events.exchange)
        # The dispatcher's own event builder (hostname, pid, logical clock), as its publish() uses.
        event = _message(channel, events._prepare_event("task-sent", sent), events.serializer,
                         dict(events.headers), {"delivery_mode": events.delivery_mode})
        if not ignore_result:
            celery_app.backend.on_task_call(producer, task_id)
        batch = channel.create_publish_batch(max_size=2)
        try:
            batch.publish(task, exchange="", routing_key=queue)
            batch.publish(event, exchange=events.exchange.name, routing_key="task.sent")
            batch.flush()
        finally:
            batch.close()


def _task_message(celery_app: Celery, channel: Any, name: str, args: list[Any], kwargs: dict[str, Any],
                  task_id: str, ignore_result: bool) -> tuple[str, Any, dict[str, Any]]:
    """(queue name, the task's message, its task-sent event's fields), as send_task makes them."""
    queue = celery_app.amqp.router.route({}, name, args, kwargs)["queue"]
    root_id = parent_id = None
    parent = celery_app.current_worker_task
    if parent is not None:  # sent from a task: Flower shows the tree
        root_id, parent_id = parent.request.root_id or parent.request.id, parent.request.id
    headers, properties, body, sent = celery_app.amqp.create_task_message(
        task_id, name, args, kwargs, reply_to=celery_app.thread_oid, create_sent_event=True,
        root_id=root_id, parent_id=parent_id, ignore_result=ignore_result,
        # What Celery's saferepr writes for these small id arguments, without its cost.
        argsrepr=repr(args) if args else "()", kwargsrepr=repr(kwargs),
    )
    # As Celery does for a direct exchange: the default exchange, keyed by the queue's name.
    properties["delivery_mode"] = queue.exchange.delivery_mode or 2
    sent.update(queue=queue.name, exchange="", routing_key=queue.name)
    return queue.name, _message(channel, body, celery_app.conf.task_serializer, headers, properties), sent


def _message(channel: Any, body: Any, serializer: str, headers: dict[str, Any], properties: dict[str, Any]) -> Any:
    """A message as kombu's Producer.publish prepares it."""
    content_type, content_encoding, payload = dumps(body, serializer=serializer)
    return channel.prepare_message(payload, 0, content_type, content_encoding, headers, properties)


def _dispatcher(celery_app: Celery) -> EventDispatcher:
    """One event dispatcher per app and process (an event names the sending pid)."""
    key = f"dunning_sent_events_{os.getpid()}"
    dispatcher: EventDispatcher | None = getattr(celery_app, key, None)
    if dispatcher is None:
        dispatcher = celery_app.events.Dispatcher(enabled=False)
        setattr(celery_app, key, dispatcher)
    return dispatcher


def enqueue_recompute(celery_app: Celery, account_id: str, trigger: str, cause: str | None = None,
                      coalesced: bool = True, keep_result: bool = False) -> str:
    """``keep_result``: store the outcome in the result backend (the support page polls it).
    Without it nothing subscribes to the backend, so sending costs one broker write and a
    broker outage is noticed at once rather than after the backend's reconnect loop."""
    return send(celery_app, "tasks.recompute_account", [account_id, trigger, cause], {"coalesced": coalesced},
                ignore_result=not keep_result)
