"""The Flask app factory: ``app:create_app()``. Nothing happens at import."""

from __future__ import annotations

from typing import Any

from flask import Flask


def create_app(settings: Any = None, runtime: Any = None, celery: Any = None) -> Flask:
    from flask.logging import default_handler as flask_log_handler

    from app import errors
    from app.account_urls import AccountIdConverter
    from app.api import accounts, health
    from app.api import bad_debt as bad_debt_api
    from app.api import metrics as metrics_api
    from app.api import ops as ops_api
    from app.api import rollout as rollout_api
    from app.config import ConfigError, Settings
    from app.green import cooperate_if_gevent
    from app.log_safety import install as install_log_safety
    from app.policy_file import PolicyFileError
    from app.runtime import Runtime
    from app.support import views as support_views
    from tasks.factory import make_celery
    from webhooks import blueprint as webhooks
    from webhooks.ingest import Ingestor

    cooperate_if_gevent()  # before anything connects: see app/green.py
    # Values interpolated into a log record escaped and capped (app/log_safety.py), on the handlers
    # the web process writes with: Flask's (the "app" logger's once it is used), gunicorn's error log
    # (set up before the app is loaded), the root logger's (a --log-config), Python's last resort.
    install_log_safety(handlers=[flask_log_handler], loggers=["", "gunicorn.error"])
    try:
        settings = settings or (runtime.settings if runtime is not None else Settings.from_env())
        runtime = runtime or Runtime.build(settings)  # validates the policy file
    except (ConfigError, PolicyFileError) as exc:
        _refused_under_gunicorn(exc)
        raise
    app = Flask(__name__)
    app.config["SECRET_KEY"] = settings.secret_key
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    app.extensions["dunning"] = runtime
    app.extensions["celery"] = celery = celery or make_celery(settings)
    app.url_map.converters["account"] = AccountIdConverter  # before the routes that name an account
    app.register_blueprint(health.bp)
    webhooks.init_app(app, Ingestor(runtime.engine, celery))
    app.register_blueprint(accounts.bp)
    app.register_blueprint(bad_debt_api.bp)
    app.register_blueprint(metrics_api.bp)
    app.register_blueprint(support_views.bp)
    app.register_blueprint(rollout_api.bp)
    app.register_blueprint(ops_api.bp)
    errors.register(app)
    return app


def _refused_under_gunicorn(exc: Exception) -> None:
    """A setting or policy file the web refuses, said in one line where gunicorn loads the app (the
    Procfile's line as honcho or foreman run it, without `dunning process`): gunicorn prints the
    message of its AppImportError and halts ("App failed to load."), where any other exception was
    its traceback in every worker before "Worker failed to boot"."""
    import sys

    errors = sys.modules.get("gunicorn.errors")
    if errors is not None and "gunicorn.arbiter" in sys.modules:
        raise errors.AppImportError(f"error: {exc}") from None
