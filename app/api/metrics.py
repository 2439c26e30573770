"""GET /metrics: Prometheus text (DESIGN section 9), the database gauges refreshed first.

Open like Flower's /metrics: counts only, no account data. When the database is unreachable the
process counters are still exposed (the gauges keep their last values) and
``dunning_metrics_db_refresh_ok`` says 0.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response
from prometheus_client import Gauge

from app import metrics, metrics_db
from app.web import runtime

log = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)

# The newest write of any web worker: the last scrape's. (livemin, 0 while any worker's last refresh
# failed, kept a worker's 0 after gunicorn replaced it: nothing marks a web worker dead.)
REFRESH_OK = Gauge("dunning_metrics_db_refresh_ok", "1 when the last scrape could read the database gauges",
                   multiprocess_mode=metrics.FLEET)


@bp.get("/metrics")
def prometheus() -> Response:
    rt = runtime()
    try:
        metrics_db.refresh(rt.engine, rt.policy.guard_window_minutes)
        REFRESH_OK.set(1)
    except Exception as exc:
        log.warning("metrics: database gauges not refreshed (%s)", exc.__class__.__name__)
        REFRESH_OK.set(0)
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)
