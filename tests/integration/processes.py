"""Real Celery worker and Flower processes for the tests that need a process of their own
(SIGKILL, Flower's HTTP API), on the test database, broker and key prefix."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]
CELERY = str(Path(sys.executable).with_name("celery"))


def answers(url: str) -> bool:
    """True when ``url`` answers 200 now (a server that is not up yet answers nothing)."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(settings: Settings, visibility_timeout: int | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "DUNNING_", "STRIPE_"))}
    env.update(
        DATABASE_URL=settings.database_url,
        CELERY_BROKER_URL=settings.broker_url,
        CELERY_BROKER_KEY_PREFIX=settings.broker_key_prefix or "",
        CELERY_VISIBILITY_TIMEOUT=str(visibility_timeout or settings.visibility_timeout),
        STRIPE_API_KEY=settings.stripe_api_key,
        STRIPE_WEBHOOK_SECRET=settings.stripe_webhook_secret,
        SECRET_KEY=settings.secret_key,
        PYTHONPATH=str(ROOT),
    )
    if settings.stripe_api_base:
        env["STRIPE_API_BASE"] = settings.stripe_api_base
    if settings.account_management_url:
        env["ACCOUNT_MANAGEMENT_URL"] = settings.account_management_url
    env.update(extra)
    return env


@contextmanager
def celery_process(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """``celery -A tasks <args>``; stopped (TERM, then KILL) when the block ends. Output goes to a
    temporary file, printed when the test fails (pytest shows captured output)."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([CELERY, "-A", "tasks", *args], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.seek(0)
            print(log.read().decode(errors="replace")[-6000:])
