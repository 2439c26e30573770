"""Log injection: a value interpolated into a log message (an account id other teams chose, a
Stripe id or text, an HTTP input) holding a newline, a carriage return or an ANSI escape is written
escaped, on its record's one line; a very long one is cut. In every process, set up as it is run:
a real Celery worker (prefork, as the Procfile runs it), beat's logging setup, the web process under
gunicorn (`dunning process web`), the Flask app outside gunicorn, and the `dunning` command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import Engine

from app.config import Settings
from tasks.factory import make_celery
from tests.conftest import Accounts, wait_for
from tests.integration.processes import CELERY, DUNNING, ROOT, answers, env_for, free_port
from tests.integration.test_webhook_ingest import failed_invoice
from tests.stripe_events import body_and_headers

FORGED = "INFO forged: bad debt lifted for acct_victim"


def hostile(prefix: str) -> tuple[str, str]:
    """An id that would forge a record, and how it is written once escaped."""
    tag = uuid.uuid4().hex[:8]
    return (f"{prefix}_{tag}\n{FORGED}\r\x1b[2K\u2028",
            f"{prefix}_{tag}\\n{FORGED}\\r\\x1b[2K\\u2028")


def assert_one_line(text: str, escaped: str, marker: str) -> str:
    """The record holding ``marker`` is one line holding ``escaped``; nothing raw leaked."""
    lines = text.split("\n")
    assert not any(line.startswith(FORGED) for line in lines), text
    assert "\x1b" not in text and "\r" not in text and "\u2028" not in text, text
    (line,) = [line for line in lines if marker in line]
    assert escaped in line, line
    return line


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_worker_writes_an_account_id_with_a_newline_on_its_record_s_one_line(settings: Settings, clean: None,
                                                                                tmp_path: Path) -> None:
    account, escaped = hostile("acct")
    long_account = "acct_long_" + "x" * 2000
    queue = f"logtest-{uuid.uuid4().hex[:8]}"  # the session worker of other tests never sees the tasks
    log = tmp_path / "worker.log"
    producer = make_celery(settings)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [CELERY, "-A", "tasks", "worker", "-Q", queue, "--concurrency", "1", "--without-mingle",
             "--without-gossip", "-l", "info", "-n", f"log-{queue}@%h"],
            cwd=ROOT, env=env_for(settings), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # No such account: the recompute gives up (invalid data) and logs the id at error level.
            producer.send_task("tasks.recompute_account", [account], queue=queue)
            producer.send_task("tasks.recompute_account", [long_account], queue=queue)
            wait_for(lambda: log.read_text(errors="replace").count("gave up its own retries") >= 2, timeout=90,
                     message="the worker's two give-ups")
        finally:
            _stop(proc)
    text = log.read_text(errors="replace")
    assert_one_line(text, escaped, f"recompute_account for {escaped.split(chr(92))[0]}")
    (long_line,) = [line for line in text.split("\n") if "gave up" in line and "acct_long_" in line]
    assert "acct_long_" + "x" * 490 + "...[" in long_line
    assert "more characters]" in long_line and len(long_line) < 1500, long_line


BEAT = """
import logging, sys
from celery.apps.beat import Beat
from celery.utils.log import get_task_logger
from tasks.celery import app

Beat(app=app, loglevel="INFO").setup_logging()  # what `celery -A tasks beat -l info` does
logging.getLogger("app.payments.bad_debt_settle").warning("bad-debt payment %s settled for %s", "pay_1", sys.argv[1])
get_task_logger("tasks.bad_debt").warning("task logger: %s", sys.argv[1])
"""


def test_beat_s_logging_setup_escapes_an_account_id(settings: Settings) -> None:
    account, escaped = hostile("acct")
    done = subprocess.run([sys.executable, "-c", BEAT, account], cwd=ROOT, env=env_for(settings),
                          capture_output=True, timeout=120, check=True)
    text = (done.stdout + done.stderr).decode()
    assert_one_line(text, escaped, "settled for")
    assert_one_line(text, escaped, "task logger:")


FLASK_APP = """
import logging, sys
from app import create_app

app = create_app()  # as `flask --app app:create_app run` or a WSGI server other than gunicorn builds it
logging.getLogger("webhooks.ingest").warning("no handler above: %s", sys.argv[1])  # Python's last resort
with app.app_context():
    app.logger.warning("flask handler: %s", sys.argv[1])
    logging.getLogger("app.payments.bad_debt_webhook").error("bad-debt payment %s of %s disputed", "pay_1",
                                                             sys.argv[1])
"""


def test_the_flask_app_escapes_an_account_id_in_its_log(settings: Settings) -> None:
    account, escaped = hostile("acct")
    done = subprocess.run([sys.executable, "-c", FLASK_APP, account], cwd=ROOT, env=env_for(settings),
                          capture_output=True, timeout=120, check=True)
    text = done.stderr.decode()
    assert_one_line(text, escaped, "no handler above:")
    assert_one_line(text, escaped, "flask handler:")
    assert_one_line(text, escaped, "disputed")


CLI = """
import logging, sys
from app.cli import main

code = main(["process", "no-such-process"])  # a command that fails at once, logging set up as any does
logging.getLogger("app.sweep.sweep").warning("drift sweep: could not enqueue the recompute of %s", sys.argv[1])
sys.exit(code)
"""


def test_the_dunning_command_escapes_an_account_id_in_its_log(settings: Settings) -> None:
    account, escaped = hostile("acct")
    done = subprocess.run([sys.executable, "-c", CLI, account], cwd=ROOT, env=env_for(settings),
                          capture_output=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert_one_line(done.stderr.decode(), escaped, "could not enqueue")


def test_the_web_process_under_gunicorn_escapes_a_stripe_event_id(runtime: Any, engine: Engine, accounts: Accounts,
                                                                   tmp_path: Path) -> None:
    """A signed event nothing can store (a NUL in a text) is refused with a warning naming its id:
    an id holding a newline stays on the warning's line."""
    _account, customer = accounts.create()
    event_id, escaped = hostile("evt")
    evt = failed_invoice(customer)
    evt["id"] = event_id
    evt["data"]["object"]["billing_reason"] = "manual\x00"
    body, headers = body_and_headers(evt, runtime.settings.stripe_webhook_secret)
    port = free_port()
    log = tmp_path / "web.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([DUNNING, "process", "web"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                env=env_for(runtime.settings, PORT=str(port), DUNNING_DATA_DIR=str(tmp_path / "data"),
                                            WEB_CONCURRENCY="1"))
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for(lambda: answers(f"{base}/healthz") or proc.poll() is not None, timeout=60,
                     message="the web process")
            assert proc.poll() is None, log.read_text(errors="replace")
            response = requests.post(f"{base}/webhooks/stripe", data=body.encode(), headers=headers, timeout=30)
            assert response.status_code == 422, response.text
            wait_for(lambda: "webhook not storable" in log.read_text(errors="replace"), timeout=30,
                     message="the warning")
        finally:
            _stop(proc)
    assert_one_line(log.read_text(errors="replace"), escaped, "webhook not storable")
