import sys

from app.config import ConfigError
from app.policy_file import PolicyFileError
from tasks.factory import make_celery

try:
    app = make_celery()
except (ConfigError, PolicyFileError) as exc:
    # `celery -A tasks worker|beat|flower` as any runner of the Procfile starts them (honcho, foreman):
    # one line naming the setting, as `dunning process` says it (status 2), not Celery's "Unable to
    # load celery application" and the traceback it ends.
    print(f"error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None
