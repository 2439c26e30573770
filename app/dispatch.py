"""Putting work on the queues. Everything that enqueues goes through here.

On Redis (the product's broker) tasks leave through the Redis lane (app/redis_lane.py): the
messages Celery's ``send_task`` would publish, each with its task-sent event for Flower, any number
of them in one pipelined round trip. Other brokers take Celery's own path, one task at a time.
tests/integration/test_dispatch.py holds the two paths' messages equal.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery

from app.ids import uuid4_str
from app.redis_lane import TaskCall, lane_for
from tasks.broker import is_plain_redis

log = logging.getLogger(__name__)

__all__ = ["SEND_RETRY_POLICY", "BrokerUnavailable", "TaskCall", "enqueue_recompute", "send", "send_many"]


class BrokerUnavailable(Exception):
    """The broker did not take the message."""


# Ingest must answer fast: when the broker is down, give up quickly; beat re-drives the request.
SEND_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
# A write that failed (no connection, or one the broker dropped: a restart) is tried once more on a
# new connection. A batch that failed half-way may then deliver a message twice, which every task
# here tolerates (recompute is idempotent, payments carry idempotency keys).
ATTEMPTS = 1 + int(SEND_RETRY_POLICY["max_retries"])


def send(celery_app: Celery, name: str, args: list[Any] | None = None, kwargs: dict[str, Any] | None = None,
         *, task_id: str | None = None, ignore_result: bool = True) -> str:
    """Publish task ``name`` and its task-sent event; the task id. Raises BrokerUnavailable."""
    call = TaskCall(name, list(args or []), dict(kwargs or {}), task_id or uuid4_str(), ignore_result)
    return _send_one(celery_app, call)


def _send_one(celery_app: Celery, call: TaskCall) -> str:
    send_many(celery_app, [call])
    return call.task_id


def send_many(celery_app: Celery, calls: Sequence[TaskCall], *, bound: float | None = None) -> None:
    """Publish every task with its task-sent event, in one broker round trip on Redis.
    All or nothing as far as the caller knows: raises BrokerUnavailable if any may be missing.
    ``bound`` (seconds): on Redis, no connect, write or read waits longer (a lane of its own), and
    one that timed out is not tried again, so a hung broker costs the caller about ``bound``, not
    the transport's timeouts twice (webhook ingest: its events are committed, beat re-drives them).
    A write the broker refused at once (a connection a restart dropped) is still tried once more."""
    if not calls:
        return
    if not _lane_serves(celery_app.conf.broker_url):  # not the product's Redis: Celery's own path
        for call in calls:
            _send_task(celery_app, call)
        return
    for attempt in range(1, ATTEMPTS + 1):
        try:
            # The lane is built inside the try (once per process; then a lookup): a broker it cannot
            # even address (a URL redis-py cannot read) did not take the messages either, and the
            # caller must hear BrokerUnavailable: the events are committed, beat re-drives them.
            lane_for(celery_app, bound).publish(calls)
            break
        except Exception as exc:  # redis-py raises ConnectionError, TimeoutError, ResponseError, ValueError...
            if attempt == ATTEMPTS or (bound is not None and isinstance(exc, redis.TimeoutError)):
                names = ", ".join(sorted({c.name for c in calls}))
                raise BrokerUnavailable(f"broker did not accept {names}: {exc.__class__.__name__}") from exc
    for call in calls:
        if not call.ignore_result:  # as send_task does: the backend may watch for the result
            try:
                celery_app.backend.on_task_call(None, call.task_id)
            except Exception as exc:  # the task is queued all the same: its caller must not hear otherwise
                log.warning("result backend does not watch task %s (%s); its result may not be seen",
                            call.task_id, exc.__class__.__name__)


def _lane_serves(broker_url: str) -> bool:
    """One Redis server the lane can write to. Not a failover list of brokers (';'-separated, which
    kombu goes through in turn): redis-py reads the first address of it only and no database number
    ('/1;redis://...' is none, so database 0), so the lane wrote where no worker reads."""
    return is_plain_redis(broker_url) and ";" not in broker_url


def _send_task(celery_app: Celery, call: TaskCall) -> None:
    try:
        with celery_app.producer_or_acquire() as producer:
            # Connect within the send policy: kombu's own default keeps retrying for the broker
            # connection timeout, seconds that a webhook cannot wait.
            producer.connection.ensure_connection(
                max_retries=SEND_RETRY_POLICY["max_retries"], interval_start=SEND_RETRY_POLICY["interval_start"],
                interval_step=SEND_RETRY_POLICY["interval_step"], interval_max=SEND_RETRY_POLICY["interval_max"])
            celery_app.send_task(call.name, args=call.args, kwargs=call.kwargs, task_id=call.task_id,
                                 ignore_result=call.ignore_result, producer=producer, retry=True,
                                 retry_policy=SEND_RETRY_POLICY)
    except Exception as exc:  # kombu raises several types (OperationalError, ConnectionError, ...)
        raise BrokerUnavailable(f"broker did not accept {call.name}: {exc.__class__.__name__}") from exc


def recompute_call(account_id: str, trigger: str, cause: str | None = None, coalesced: bool = True,
                   keep_result: bool = False) -> TaskCall:
    return TaskCall("tasks.recompute_account", [account_id, trigger, cause], {"coalesced": coalesced}, uuid4_str(),
                    ignore_result=not keep_result)


def enqueue_recompute(celery_app: Celery, account_id: str, trigger: str, cause: str | None = None,
                      coalesced: bool = True, keep_result: bool = False) -> str:
    """``keep_result``: store the outcome in the result backend (the support page polls it).
    Without it nothing subscribes to the backend, so sending costs one broker write and a
    broker outage is noticed at once rather than after the backend's reconnect loop."""
    return _send_one(celery_app, recompute_call(account_id, trigger, cause, coalesced, keep_result))
