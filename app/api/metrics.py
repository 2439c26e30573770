"""GET /metrics: Prometheus text (DESIGN section 9), the database gauges refreshed first.

Open like Flower's /metrics: counts only, no account data. When the database is unreachable the
process counters are still exposed (the gauges keep their last values) and
``dunning_metrics_db_refresh_ok`` says 0.
"""

from __future__ import annotations

from flask import Blueprint, Response

from app import metrics, metrics_db
from app.web import runtime

bp = Blueprint("metrics", __name__)

REFRESH_OK = metrics_db.REFRESH_OK  # (defined with the gauges it reports on; the worker sets it too)


@bp.get("/metrics")
def prometheus() -> Response:
    rt = runtime()
    metrics_db.refresh_for_scrape(rt.engine, rt.policy.guard_window_minutes)
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)
