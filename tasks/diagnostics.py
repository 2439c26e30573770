"""tasks.noop: does nothing. The broker-and-worker overhead baseline the benchmarks compare
recompute with, and a cheap canary an operator can send through any queue."""

from __future__ import annotations

from celery import shared_task


@shared_task(name="tasks.noop", ignore_result=True)
def noop() -> None:
    return None
