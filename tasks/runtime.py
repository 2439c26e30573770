"""The Runtime of the worker process, built on first use from the Celery app's Settings."""

from __future__ import annotations

from typing import Any

from app.runtime import Runtime

_RUNTIMES: dict[int, Runtime] = {}


def runtime_for(celery_app: Any) -> Runtime:
    key = id(celery_app)
    runtime = _RUNTIMES.get(key)
    if runtime is None:
        runtime = Runtime.build(celery_app.dunning_settings)
        _RUNTIMES[key] = runtime
    return runtime


def reset_after_fork() -> None:
    for runtime in _RUNTIMES.values():
        runtime.engine.dispose(close=False)
