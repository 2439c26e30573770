"""Building the Celery app from Settings. Nothing connects at import."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger, worker_process_init
from kombu import Queue

from app.config import Settings, task_time_limits
from app.history.prune import check_retention
from app.log_safety import install as install_log_safety
from app.policy_file import load_policy
from tasks import queues
from tasks.broker import is_plain_redis, serve_redis_urls
from tasks.schedule import BEAT_SCHEDULE

# Imported by every worker at start (tasks.killed holds no task: its signal handlers run in the
# worker's main process).
TASK_MODULES = ["tasks.recompute", "tasks.redrive", "tasks.payments", "tasks.outbox", "tasks.stuck", "tasks.sweeps",
                "tasks.bad_debt", "tasks.metrics", "tasks.diagnostics", "tasks.killed", "tasks.history"]

# A task whose pool child died under it (out of memory, a crash) is sent again after this many
# seconds, as a retry, while its retries (all of them, its failure class's included) are fewer than
# LOST_WORKER_RETRIES; then it is failed and recorded as dead stuck work (tasks/killed.py) rather
# than requeued for ever. Our own failure handling always passes its own max_retries.
LOST_WORKER_DELAY = 2
LOST_WORKER_RETRIES = 3
BROKER_SOCKET_TIMEOUT = 10  # seconds a Redis broker's answer is waited for (connect: 3)


def default_result_backend(broker_url: str) -> str:
    """The result backend when CELERY_RESULT_BACKEND is unset and the broker is Redis: the broker's
    server, or with a failover list of brokers (';'-separated, which kombu goes through in turn) its
    first one. Celery's Redis result backend reads one URL only: given the whole list it took the
    rest for the database number and no worker started. It does not fail over: after a failover the
    support page's results are unreachable until the first server is back (set CELERY_RESULT_BACKEND
    to a store of its own for that).
    Celery's Redis result backend refuses a rediss:// URL that does not say how to check the server's
    certificate (ssl_cert_reqs), where kombu takes one as the broker: no worker started. The broker's
    own is then the strict one, the certificate required."""
    first = broker_url.split(";", 1)[0]
    if first.startswith("rediss://") and "ssl_cert_reqs=" not in first.partition("?")[2]:
        first += ("&" if "?" in first else "?") + "ssl_cert_reqs=required"
    return first


def celery_config(settings: Settings) -> dict[str, Any]:
    vt = settings.visibility_timeout
    hard_limit, soft_limit = task_time_limits(vt)
    broker_is_redis = settings.broker_url.startswith(("redis://", "rediss://", "redis+socket://"))
    backend = settings.result_backend or (default_result_backend(settings.broker_url) if broker_is_redis
                                          else "db+" + settings.database_url)
    transport: dict[str, Any] = {"visibility_timeout": vt}
    if broker_is_redis:
        # After a worker is killed, kombu restores its unacknowledged messages from a sweep that
        # scans only every interval * throttle seconds (10 * 10 by default, kombu 5.7 redis.py);
        # throttle 1 makes it every 10 s, so redelivery follows the visibility timeout closely.
        transport["unacked_restore_interval"] = 10
        transport["unacked_restore_throttle"] = 1
        transport["socket_connect_timeout"] = 3
        # A read waits at most this long (kombu's own default: for ever). Every sender that does not
        # take the Redis lane (a failover list of brokers, app/dispatch.py _lane_serves) publishes
        # through kombu: with a hung broker (taking connections, never answering) its publish waited
        # for ever, and the webhook flush with it, holding every webhook of the web process queued
        # behind it. The lane takes the same bound (app/redis_lane.py).
        transport["socket_timeout"] = BROKER_SOCKET_TIMEOUT
        if settings.broker_key_prefix:
            transport["global_keyprefix"] = settings.broker_key_prefix
    return {
        "broker_url": settings.broker_url,
        "result_backend": backend,
        "broker_transport_options": transport,
        "result_backend_transport_options": dict(transport),
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
        # A task is acknowledged when it finishes; a worker that dies mid-task gives it back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,  # used when the retry below cannot be sent (broker down)
        "task_retry_on_worker_lost": True,
        "task_annotations": {"*": {"default_retry_delay": LOST_WORKER_DELAY, "max_retries": LOST_WORKER_RETRIES}},
        "worker_prefetch_multiplier": 1,
        # Flower sees every state: sent, received, started, retried, failed, succeeded.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "result_expires": 24 * 3600,
        "result_extended": True,
        "task_routes": queues.ROUTES,
        "task_queues": [Queue(name) for name in queues.ALL],
        "task_default_queue": queues.RECOMPUTE,
        "task_create_missing_queues": True,
        "beat_schedule": BEAT_SCHEDULE,
        # Limits that keep a hung task (and one waiting behind it) inside the visibility timeout,
        # so neither is delivered twice (app/config.py).
        "task_time_limit": hard_limit,
        "task_soft_time_limit": soft_limit,
        "worker_hijack_root_logger": False,
    }


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or Settings.from_env()
    # Validate the policy file now, so a worker or beat with a bad one stops at start-up naming the
    # key, instead of failing its first task. So does a history retention shorter than its rollout
    # gate reads.
    check_retention(settings.history_retention_days, load_policy(settings.policy_path))
    if is_plain_redis(settings.broker_url):
        serve_redis_urls()  # the product's Redis transport (tasks/broker.py), under redis:// itself
    app = Celery("dunning", include=TASK_MODULES, set_as_current=False)
    app.conf.update(celery_config(settings))
    app.dunning_settings = settings
    return app


@worker_process_init.connect
def _reset_after_fork(**_: Any) -> None:
    # Connections inherited from the parent must not be shared with it after fork.
    from tasks.runtime import reset_after_fork

    reset_after_fork()


@after_setup_logger.connect
@after_setup_task_logger.connect
def _escape_logged_values(logger: Any = None, **_: Any) -> None:
    # Worker and beat (`celery -A tasks worker|beat`) once Celery has set up their logging: the
    # values interpolated into a record are escaped and capped on its handlers (app/log_safety.py).
    from celery.utils.log import get_multiprocessing_logger

    install_log_safety(loggers=[get_multiprocessing_logger(), *([logger] if logger is not None else [])])
