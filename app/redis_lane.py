"""Celery task messages written straight to Redis: any number of tasks, each with its task-sent
event, in one pipelined round trip.

Every message is the one Celery's ``send_task`` publishes through kombu's Redis transport: its
static parts come from Celery itself (``app.amqp.create_task_message`` and the event dispatcher,
run once per task name as a template), and only what differs per task is filled in here (id,
arguments, their reprs, delivery tag, the event's clock and time). tests/integration/test_dispatch.py
holds the two equal. What is skipped is the cost around them: kombu's producer pool, option merging,
per-message copies and the channel's publish machinery cost about three times the Redis round
trip itself, on every webhook (bench/ingest.py).

Key names follow kombu's Redis channel: the queue is a list named after it (priority 0), events go
to the fanout topic ``/<db>.celeryev/task.sent`` (kombu's prefix ``/{db}.`` with the broker's database
number put in, as kombu 5.4 and later do; event receivers such as Flower's subscribe there), and the
transport's ``global_keyprefix`` comes in front of both.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from celery import Celery
from kombu.utils.json import dumps as kombu_dumps
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.ids import uuid4_str
from tasks.broker import Channel


def _dumps(value: Any) -> bytes:
    """kombu's JSON serializer, byte for byte: json.dumps matches it for JSON's own types and is
    only faster (kombu makes a new encoder per call). Anything else (a datetime, a UUID) goes
    through kombu. For the task's body, which Celery's own message must equal exactly."""
    try:
        return json.dumps(value).encode()
    except TypeError:
        return str(kombu_dumps(value)).encode()


def _compact(value: Any) -> bytes:
    """JSON for what is decoded, never compared as bytes (envelopes, event bodies): orjson, in
    about a fifth of json.dumps' time. Its output differs only in spacing."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: a type orjson does not know
        return _dumps(value)


@dataclass(frozen=True)
class TaskCall:
    """One task to publish. ``ignore_result``: no result is stored (nobody polls it)."""

    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    task_id: str
    ignore_result: bool = True


def _fanout_topic(options: dict[str, Any], exchange: str, routing_key: str, db: int) -> str:
    """The PUB/SUB channel kombu's Redis channel publishes a fanout message to, on database ``db``."""
    fanout = options.get("fanout_prefix", Channel.fanout_prefix)
    # kombu puts the database number into the prefix when it builds its connection pool (_get_pool).
    prefix = (fanout if isinstance(fanout, str) else (Channel.keyprefix_fanout if fanout else "")).format(db=db)
    if options.get("fanout_patterns", Channel.fanout_patterns):
        return f"{prefix}{exchange}/{routing_key}"
    return f"{prefix}{exchange}"


@dataclass(frozen=True)
class _Template:
    queue: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    embed: dict[str, Any]
    sent: dict[str, Any]


class RedisLane:
    """Per process and Celery app (a forked child builds its own: sockets are not shared)."""

    def __init__(self, celery_app: Celery, timeout: float | None = None) -> None:
        """``timeout``: the most its connect, and each write and read, may wait (seconds), when shorter
        than the transport's own (socket_connect_timeout 3, socket_timeout 10)."""
        conf = celery_app.conf
        options = conf.broker_transport_options or {}
        self.app = celery_app
        self.prefix = options.get("global_keyprefix") or ""
        connect_timeout, socket_timeout = options.get("socket_connect_timeout", 3), options.get("socket_timeout", 10)
        if timeout is not None:
            connect_timeout, socket_timeout = _shorter(connect_timeout, timeout), _shorter(socket_timeout, timeout)
        # No retries inside redis-py (6+ retries three times by default): the caller decides.
        pool = redis.ConnectionPool.from_url(
            conf.broker_url, socket_connect_timeout=connect_timeout, socket_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0))
        # Connects on first use (and again after an error); redis-py handles TLS, AUTH and SELECT.
        self.connection = pool.make_connection()
        self.events = celery_app.events.Dispatcher(enabled=False)
        db = int(pool.connection_kwargs.get("db") or 0)  # as kombu reads the URL's path: none is 0
        self.event_topic = self.prefix + _fanout_topic(options, self.events.exchange.name, "task.sent", db)
        self.event_headers = dict(self.events.headers)
        self.event_properties = {"delivery_mode": self.events.delivery_mode, "priority": 0, "body_encoding": "base64"}
        self.event_delivery_info = {"exchange": self.events.exchange.name, "routing_key": "task.sent"}
        self.templates: dict[tuple[str, bool, tuple[Any, Any]], _Template] = {}
        self.lock = threading.Lock()  # the connection, the event dispatcher's clock, the template cache

    def _template(self, name: str, ignore_result: bool) -> _Template:
        # As send_task does: a task registered in this process sends its time limits (a worker
        # applies its own task's limits when a message has none, so either way they hold).
        registered = self.app._tasks.get(name)
        limits = (registered.time_limit, registered.soft_time_limit) if registered is not None else (None, None)
        key = (name, ignore_result, limits)
        template = self.templates.get(key)
        if template is None:
            queue = self.app.amqp.router.route({}, name, [], {})["queue"]
            headers, properties, body, sent = self.app.amqp.create_task_message(
                "", name, [], {}, reply_to=self.app.thread_oid, create_sent_event=True, ignore_result=ignore_result,
                argsrepr="", kwargsrepr="", time_limit=limits[0], soft_time_limit=limits[1])
            # As Celery does for a direct exchange: the default exchange, keyed by the queue's name.
            properties["delivery_mode"] = queue.exchange.delivery_mode or 2
            properties["delivery_info"] = {"exchange": "", "routing_key": queue.name}
            properties["priority"] = 0
            properties["body_encoding"] = "base64"
            sent.update(queue=queue.name, exchange="", routing_key=queue.name)
            template = _Template(queue.name, headers, properties, body[2], sent)
            self.templates[key] = template
        return template

    def messages(self, calls: Sequence[TaskCall]) -> list[tuple[str | bytes, ...]]:
        """The commands that publish every task, then every task-sent event, each in call order:
        one LPUSH per queue holding its tasks (as many LPUSHes of one would), one PUBLISH per event."""
        parent = self.app.current_worker_task
        root_id = parent_id = None
        if parent is not None:  # sent from a task: Flower shows the tree
            root_id, parent_id = parent.request.root_id or parent.request.id, parent.request.id
        tasks: dict[str, list[bytes]] = {}
        events: list[tuple[str | bytes, ...]] = []
        with self.lock:
            for call in calls:
                t = self._template(call.name, call.ignore_result)
                argsrepr = repr(call.args) if call.args else "()"
                kwargsrepr = repr(call.kwargs)
                headers = {**t.headers, "id": call.task_id, "root_id": root_id or call.task_id,
                           "parent_id": parent_id, "argsrepr": argsrepr, "kwargsrepr": kwargsrepr}
                body = _dumps([call.args, call.kwargs, t.embed])
                # Serialised at once, so the template's nested dicts are shared, not copied.
                properties = {**t.properties, "correlation_id": call.task_id, "delivery_tag": uuid4_str()}
                task = {"body": base64.b64encode(body).decode(), "content-encoding": "utf-8",
                        "content-type": "application/json", "headers": headers, "properties": properties}
                fields = {**t.sent, "uuid": call.task_id, "root_id": root_id or call.task_id, "parent_id": parent_id,
                          "args": argsrepr, "kwargs": kwargsrepr}
                # The dispatcher's own event builder (hostname, pid, logical clock), as its publish() uses.
                event_body = _compact(self.events._prepare_event("task-sent", fields))
                event_properties = {**self.event_properties, "delivery_info": self.event_delivery_info,
                                    "delivery_tag": uuid4_str()}
                event = {"body": base64.b64encode(event_body).decode(), "content-encoding": "utf-8",
                         "content-type": "application/json", "headers": self.event_headers,
                         "properties": event_properties}
                tasks.setdefault(self.prefix + t.queue, []).append(_compact(task))
                events.append(("PUBLISH", self.event_topic, _compact(event)))
        # A task is in its queue before its event is out, as with send_task.
        pushes: list[tuple[str | bytes, ...]] = [("LPUSH", queue, *payloads) for queue, payloads in tasks.items()]
        return pushes + events

    def publish(self, calls: Sequence[TaskCall]) -> None:
        """Write every task and its event in one round trip. Raises redis' errors; the connection
        is then dropped, and the next call opens a new one."""
        commands = self.messages(calls)
        # One connection of our own, used under a lock, rather than the client's pool and pipeline:
        # their bookkeeping cost more CPU than the round trip (bench/ingest.py).
        with self.lock:
            conn = self.connection
            try:
                conn.send_packed_command(conn.pack_commands(commands))
                for _ in commands:
                    conn.read_response()  # raises on an error reply
            except BaseException:
                conn.disconnect()  # the replies left unread would answer the next call
                raise


def _shorter(timeout: float | None, bound: float) -> float:
    return bound if timeout is None else min(float(timeout), bound)


_lanes_lock = threading.Lock()


def lane_for(celery_app: Celery, timeout: float | None = None) -> RedisLane:
    """This process's lane for ``celery_app`` (built on first use, again after a fork); with
    ``timeout``, a lane of its own (its own connection) whose every wait is bounded by it."""
    pid = os.getpid()
    lanes: dict[float | None, tuple[int, RedisLane]] | None = getattr(celery_app, "dunning_redis_lanes", None)
    held = lanes.get(timeout) if lanes is not None else None
    if held is None or held[0] != pid:
        with _lanes_lock:
            lanes = getattr(celery_app, "dunning_redis_lanes", None)
            if lanes is None:
                lanes = celery_app.dunning_redis_lanes = {}
            held = lanes.get(timeout)
            if held is None or held[0] != pid:
                held = lanes[timeout] = (pid, RedisLane(celery_app, timeout))
    return held[1]
