"""Putting work on the queues. Everything that enqueues goes through here."""

from __future__ import annotations

from typing import Any

from celery import Celery


class BrokerUnavailable(Exception):
    """The broker did not take the message."""


# Ingest must answer fast: when the broker is down, give up quickly; beat re-drives the request.
SEND_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


def send(celery_app: Celery, name: str, args: list[Any] | None = None, kwargs: dict[str, Any] | None = None,
         **options: Any) -> str:
    try:
        result = celery_app.send_task(name, args=args or [], kwargs=kwargs or {}, retry=True,
                                      retry_policy=SEND_RETRY_POLICY, **options)
    except Exception as exc:  # kombu raises several types (OperationalError, ConnectionError, ...)
        raise BrokerUnavailable(f"broker did not accept {name}: {exc.__class__.__name__}") from exc
    return str(result.id)


def enqueue_recompute(celery_app: Celery, account_id: str, trigger: str, cause: str | None = None,
                      coalesced: bool = True, keep_result: bool = False) -> str:
    """``keep_result``: store the outcome in the result backend (the support page polls it).
    Without it nothing subscribes to the backend, so sending costs one broker write and a
    broker outage is noticed at once rather than after the backend's reconnect loop."""
    return send(celery_app, "tasks.recompute_account", [account_id, trigger, cause], {"coalesced": coalesced},
                ignore_result=not keep_result)
