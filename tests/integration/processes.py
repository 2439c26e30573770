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
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from app.config import Settings
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
CELERY = str(Path(sys.executable).with_name("celery"))
DUNNING = str(Path(sys.executable).with_name("dunning"))


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


@dataclass
class WebProcess:
    base: str  # http://127.0.0.1:PORT
    returncode: int | None = None  # once stopped


@contextmanager
def web_process(settings: Settings, data_dir: Path, **env: str) -> Iterator[WebProcess]:
    """``dunning process web``, as a container runs it, on a free port and ``data_dir``; yielded once
    /healthz answers. Stopped at the end with SIGTERM, what a container's stop sends (then SIGKILL to
    anything it did not reach); ``returncode`` says how it ended."""
    port = free_port()
    proc = subprocess.Popen([DUNNING, "process", "web"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**env_for(settings, PORT=str(port), DUNNING_DATA_DIR=str(data_dir)), **env})
    web = WebProcess(f"http://127.0.0.1:{port}")
    try:
        wait_for(lambda: answers(f"{web.base}/healthz") or proc.poll() is not None, timeout=60,
                 message="the web process")
        assert proc.poll() is None, "the web process exited"
        yield web
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            web.returncode = proc.wait(timeout=60)
        finally:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
