"""Metrics of one recompute (counted after its transaction committed)."""

from __future__ import annotations

from app import metrics
from app.domain.events import BadDebtEntered, BadDebtExited
from app.recompute.service import RecomputeResult


def observe_failure(trigger: str) -> None:
    """A run that raised (it is retried or given up by its failure class): an outcome of its own, so
    that failed recomputes show next to the changed and unchanged ones of the same trigger."""
    metrics.RECOMPUTES.labels(trigger, "failed").inc()


def observe(result: RecomputeResult) -> None:
    metrics.RECOMPUTES.labels(result.trigger, result.outcome).inc()
    if result.outcome == "unchanged":
        metrics.RECOMPUTE_NOOP.labels(result.trigger).inc()
    for step, seconds in result.timings.items():
        metrics.RECOMPUTE_SECONDS.labels(step).observe(seconds)
    if result.timings:  # a run that computed (a coalesced one stopped before)
        metrics.RECOMPUTE_DURATION.labels(result.trigger).observe(sum(result.timings.values()))
    if result.applied is None or result.decision is None:
        return
    if result.applied.episode == "joined":
        # Products that joined an open bad-debt episode enter bad debt too (under the episode's
        # reason), as its exit counts them: no second BadDebtEntered, whose products are the entry's.
        for product in result.applied.episode_products:
            metrics.BAD_DEBT_ENTRIES.labels(result.applied.episode_reason or "-", product).inc()
    for event in result.applied.events:
        metrics.DOMAIN_EVENTS.labels(event.name).inc()
        if isinstance(event, BadDebtEntered):
            for product in event.products or ["-"]:
                metrics.BAD_DEBT_ENTRIES.labels(event.reason, product).inc()
        elif isinstance(event, BadDebtExited):
            # The products the account was in bad debt for (its episode's): the decision has none left.
            for product in result.applied.episode_products or ["-"]:
                metrics.BAD_DEBT_EXITS.labels(event.how, product).inc()
            if event.duration_seconds is not None:
                metrics.BAD_DEBT_SECONDS.observe(event.duration_seconds)
