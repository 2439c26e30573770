"""Prometheus for the workers, prefork children included.

With PROMETHEUS_MULTIPROC_DIR set (before the worker starts; the launcher and the Procfile set it),
every process, each prefork child too, writes its counters to files there, and the worker's main
process serves the aggregate on WORKER_METRICS_PORT (when set) once the worker is ready. A child
that exits is marked dead so its live gauges drop out. Without the directory the main process
serves its own registry (the solo and threads pools run tasks in it).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from celery.signals import celeryd_init, worker_process_shutdown, worker_ready, worker_shutdown

from app import metrics, metrics_db
from app.config import ConfigError, worker_metrics_port
from tasks.runtime import runtime_for

log = logging.getLogger(__name__)

PORT_ENV = "WORKER_METRICS_PORT"
ADDR_ENV = "WORKER_METRICS_ADDR"
_server: Any = None


def start_metrics_server(port: int, addr: str = "0.0.0.0", refresh: Callable[[], object] | None = None) -> Any:
    """Serve app.metrics.registry() (the multiprocess aggregate when configured) over HTTP;
    ``refresh`` runs before each scrape (the database gauges)."""
    global _server
    from prometheus_client import start_http_server

    if _server is not None:
        return _server
    registry: Any = metrics.registry()
    if refresh is not None:
        registry = metrics.RefreshFirst(registry, refresh)
    _server = start_http_server(port, addr=addr, registry=registry)
    log.info("worker metrics on http://%s:%d/metrics", addr, port)
    return _server


def stop_metrics_server() -> None:
    global _server
    if _server is not None:
        server, _thread = _server
        server.shutdown()
        server.server_close()
        _server = None


def database_gauges(celery_app: Any) -> Callable[[], bool]:
    """The fleet gauges read from the database at scrape time, with the worker's runtime (built on
    first use: its engine's connections are not handed to children forked later, see
    tasks/factory.py)."""

    def refresh() -> bool:
        try:
            rt = runtime_for(celery_app)
        except Exception as exc:  # (a policy file gone since start-up): the counters are served all the same
            log.warning("metrics: no runtime to read the database gauges with (%s)", exc.__class__.__name__)
            metrics_db.REFRESH_OK.set(0)
            return False
        return metrics_db.refresh_for_scrape(rt.engine, rt.policy.guard_window_minutes)

    return refresh


@celeryd_init.connect
def _on_worker_init(**_: Any) -> None:
    """A WORKER_METRICS_PORT that is no port stops the worker as it starts, in one line naming it (status
    2, as a bad setting stops `celery -A tasks`): the worker ran, logged an error and served no metrics."""
    try:
        worker_metrics_port(os.environ)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    try:
        port = worker_metrics_port(os.environ)
    except ConfigError as exc:  # refused at the worker's start (_on_worker_init); a worker that keeps working
        log.error("worker metrics not served: %s", exc)
        return
    if port is None:
        return
    refresh = database_gauges(sender.app) if getattr(sender, "app", None) is not None else None
    addr = metrics_address(os.environ)
    try:
        start_metrics_server(port, addr, refresh)
    except (ValueError, OSError) as exc:  # a port in use must not stop the worker from working
        log.error("worker metrics not served on %s=%r, %s=%d: %s", ADDR_ENV, addr, PORT_ENV, port, exc)


def metrics_address(env: Any) -> str:
    """WORKER_METRICS_ADDR as the address to bind: blanks dropped, an IPv6 address written as in a URL
    ([::1]) bare, as FLOWER_ADDRESS is taken; unset or empty, every IPv4 address. '[::1]' was looked
    up as a host name: no metrics, and an error naming the port."""
    return str(env.get(ADDR_ENV, "")).strip().strip("[]") or "0.0.0.0"


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    stop_metrics_server()


@worker_process_shutdown.connect
def _on_child_exit(pid: int | None = None, **_: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())
