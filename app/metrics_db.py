"""Gauges read from the database at scrape time (cheap counts, one statement).

They describe the fleet, not one process, so whichever process is scraped sets them; in
multiprocess mode the newest write wins ("mostrecent", app/metrics.FLEET).
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import Gauge
from sqlalchemy import Engine

from app import metrics

log = logging.getLogger(__name__)

# The remediation rollout stages in order (DESIGN section 6); the gauge is the index, 0 = off.
ROLLOUT_STAGES = ("off", "named", "5", "10", "25", "50", "100")
STUCK_STATES = ("retrying", "dead", "resolved")

BAD_DEBT_OPEN = Gauge("dunning_bad_debt_open_episodes", "Bad-debt episodes not yet exited",
                      multiprocess_mode=metrics.FLEET)
BAD_DEBT_PAYMENTS_PENDING = Gauge("dunning_bad_debt_payments_pending", "Bad-debt payments in flight",
                                  multiprocess_mode=metrics.FLEET)

# The newest write of any process serving /metrics: the last scrape's. (0 while the last refresh
# failed, kept after the process that wrote it exited: nothing marks a web worker dead.)
REFRESH_OK = Gauge("dunning_metrics_db_refresh_ok", "1 when the last scrape could read the database gauges",
                   multiprocess_mode=metrics.FLEET)

GAUGES_SQL = """
SELECT
  (SELECT count(*) FROM outbox WHERE delivered_at IS NULL) AS outbox_backlog,
  (SELECT count(*) FROM outbox WHERE delivered_at IS NULL AND blocked_at IS NOT NULL) AS outbox_blocked,
  (SELECT count(*) FROM subs_dunning d
    WHERE d.status = 'lifting'
      AND COALESCE((SELECT min(b.created_at) FROM bad_debt_payment b
                     WHERE b.account_id = d.account_id AND b.state = 'pending'), d.changed_at)
          < now() - make_interval(mins => %(guard)s)) AS stuck_in_lifting,
  (SELECT json_object_agg(state, n) FROM (SELECT state, count(*) AS n FROM subs_stuck_events GROUP BY state) s)
    AS stuck_events,
  (SELECT stage FROM rollout_state WHERE id = 1) AS rollout_stage,
  (SELECT count(*) FROM bad_debt_episode WHERE exited_at IS NULL) AS open_episodes,
  (SELECT count(*) FROM bad_debt_payment WHERE state = 'pending') AS pending_payments
"""


def refresh(engine: Engine, guard_window_minutes: int) -> None:
    with engine.connect() as conn:
        row = conn.exec_driver_sql(GAUGES_SQL, {"guard": guard_window_minutes}).mappings().one()
    metrics.OUTBOX_BACKLOG.set(row["outbox_backlog"])
    metrics.OUTBOX_BLOCKED.set(row["outbox_blocked"])
    metrics.STUCK_IN_LIFTING.set(row["stuck_in_lifting"])
    by_state = row["stuck_events"] or {}
    for state in sorted(set(STUCK_STATES) | set(by_state)):
        metrics.STUCK_EVENTS.labels(state).set(by_state.get(state, 0))
    stage = row["rollout_stage"] or "off"
    metrics.ROLLOUT_STAGE.set(ROLLOUT_STAGES.index(stage) if stage in ROLLOUT_STAGES else -1)
    BAD_DEBT_OPEN.set(row["open_episodes"])
    BAD_DEBT_PAYMENTS_PENDING.set(row["pending_payments"])


# One read of the gauges at a time in a process. /metrics is open (no token): without this, every
# scrape arriving while one reads held a database connection of its own, and whoever kept enough
# requests open held the whole pool, the webhooks and /pay-bad-debt waiting behind them.
_reading = threading.Lock()  # taken without waiting: as safe between gevent greenlets as between threads
_last_ok = False


def refresh_for_scrape(engine: Engine, guard_window_minutes: int) -> bool:
    """Before a scrape (the web's /metrics and the worker's): the gauges from the database, or, when
    it cannot be read, their last values kept and dunning_metrics_db_refresh_ok 0. A scrape that
    arrives while another one of this process is reading them serves the values as they are (that
    read sets them a moment later) and asks the database nothing. Never raises: the process's
    counters are served either way."""
    global _last_ok
    if not _reading.acquire(blocking=False):
        return _last_ok
    try:
        try:
            refresh(engine, guard_window_minutes)
        except Exception as exc:
            log.warning("metrics: database gauges not refreshed (%s)", exc.__class__.__name__)
            REFRESH_OK.set(0)
            _last_ok = False
            return False
        REFRESH_OK.set(1)
        _last_ok = True
        return True
    finally:
        _reading.release()
