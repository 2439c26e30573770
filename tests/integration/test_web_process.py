"""The web process as the Procfile runs it: gunicorn's gevent workers, every request a greenlet.

With one worker, so that all its requests share one thread: only cooperative waits let them
overlap. A request waiting on PostgreSQL must not hold up the other requests of its worker. gevent
makes socket waits cooperative, but psycopg2 waits in C unless app/green.py gives it gevent's wait:
without that, one slow statement would stall every request the worker holds, /healthz included."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import Engine

from tests.conftest import Accounts, wait_for
from tests.integration.processes import ROOT, web_process
from tests.integration.test_webhook_ingest import count
from tests.stripe_events import body_and_headers, event


def _statements_waiting_on_a_lock(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).scalar_one())


def test_a_webhook_waiting_on_postgresql_leaves_the_worker_free_for_other_requests(
        runtime: Any, engine: Engine, accounts: Accounts, tmp_path: Path) -> None:
    _account, customer = accounts.create()
    body, headers = body_and_headers(event("invoice.payment_failed", customer=customer),
                                     runtime.settings.stripe_webhook_secret)
    answered: dict[str, requests.Response] = {}
    with web_process(runtime.settings, tmp_path, WEB_CONCURRENCY="1") as web:
        webhook = threading.Thread(target=lambda: answered.update(
            webhook=requests.post(f"{web.base}/webhooks/stripe", data=body, headers=headers, timeout=30)))
        with engine.connect() as locker:
            # Held until rollback, well inside the app's 5 s lock_timeout.
            locker.exec_driver_sql("LOCK TABLE stripe_event IN ACCESS EXCLUSIVE MODE")
            webhook.start()
            wait_for(lambda: _statements_waiting_on_a_lock(engine), timeout=10,
                     message="the webhook's statement to wait on the lock")
            health = requests.get(f"{web.base}/healthz", timeout=3)  # a blocked worker answers nothing
            assert health.status_code == 200
            assert "webhook" not in answered  # still waiting: the lock is held
            locker.rollback()
        webhook.join(timeout=30)
    assert answered["webhook"].status_code == 200
    assert answered["webhook"].json()["state"] == "accepted" and answered["webhook"].json()["enqueued"] is True


def test_a_database_that_takes_the_connection_but_never_answers_gets_503_within_connect_timeout(
        runtime: Any, tmp_path: Path) -> None:
    """Under gevent libpq leaves connect_timeout to the wait callback (app/green.py). A server that
    accepts TCP and never answers (hung, or its backlog full) must still give Stripe its 503 and
    /readyz its answer within the timeout, not hold them for ever."""
    body, headers = body_and_headers(event("invoice.payment_failed"), runtime.settings.stripe_webhook_secret)
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)  # the kernel completes the handshakes; nothing ever reads or answers
        url = f"postgresql://postgres@127.0.0.1:{hung.getsockname()[1]}/hung"
        with web_process(runtime.settings, tmp_path, WEB_CONCURRENCY="1", DATABASE_URL=url) as web:
            webhook = requests.post(f"{web.base}/webhooks/stripe", data=body, headers=headers, timeout=30)
            ready = requests.get(f"{web.base}/readyz", timeout=30)
    assert webhook.status_code == 503 and webhook.headers["Retry-After"]
    assert webhook.elapsed.total_seconds() < 10  # the engine's connect_timeout is 3 s
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"].startswith("unreachable")
    assert ready.elapsed.total_seconds() < 10


def _stored(engine: Engine, event_id: str) -> bool:
    return count(engine, "SELECT count(*) FROM stripe_event WHERE id = %(id)s", id=event_id) == 1


def test_the_body_as_gunicorn_hands_it_over_with_a_length_chunked_or_too_large(
        runtime: Any, engine: Engine, accounts: Accounts, tmp_path: Path) -> None:
    """Stripe sends a Content-Length, and the body is read by that length; a chunked body has none
    and is read to its end; a body longer than any Stripe event is refused before it is read."""
    secret = runtime.settings.stripe_webhook_secret
    sent = {}
    for kind in ("length", "chunked", "too_large"):
        _account, customer = accounts.create()
        sent[kind] = event("invoice.payment_failed", customer=customer)
    body, headers = body_and_headers(sent["length"], secret)
    chunked_body, chunked_headers = body_and_headers(sent["chunked"], secret)
    large = dict(sent["too_large"], padding="x" * 600_000)  # an extra key: the signature still matches
    large_body, large_headers = body_and_headers(large, secret)
    chunks = [chunked_body[i:i + 1000].encode() for i in range(0, len(chunked_body), 1000)]
    with web_process(runtime.settings, tmp_path, WEB_CONCURRENCY="1") as web:
        url = f"{web.base}/webhooks/stripe"
        with_length = requests.post(url, data=body, headers=headers, timeout=30)
        chunked = requests.post(url, data=iter(chunks), headers=chunked_headers, timeout=30)
        too_large = requests.post(url, data=large_body, headers=large_headers, timeout=30)
    assert with_length.request.headers["Content-Length"] == str(len(body.encode()))
    assert with_length.status_code == 200 and with_length.json()["state"] == "accepted"
    assert chunked.request.headers["Transfer-Encoding"] == "chunked" and len(chunks) > 1
    assert chunked.status_code == 200 and chunked.json()["state"] == "accepted"
    assert too_large.status_code == 413 and "too large" in too_large.json()["reason"]
    assert _stored(engine, sent["length"]["id"]) and _stored(engine, sent["chunked"]["id"])
    assert not _stored(engine, sent["too_large"]["id"])


INTERRUPTED = """
from gevent import monkey
monkey.patch_all()
import sys, time
import gevent
from app.db import make_engine
from app.green import cooperate_if_gevent

assert cooperate_if_gevent()
engine = make_engine(sys.argv[1], pool_size=1, max_overflow=0, pool_timeout=2)
slow_backend = []

def slow():
    with engine.connect() as conn:
        slow_backend.append(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
        conn.exec_driver_sql("SELECT pg_sleep(3)")

def running(conn):
    found = conn.exec_driver_sql("SELECT count(*) FROM pg_stat_activity "
                                 "WHERE query = 'SELECT pg_sleep(3)' AND state = 'active'").scalar_one()
    conn.commit()  # pg_stat_activity is read once per transaction
    return found

waiting = gevent.spawn(slow)
deadline = time.monotonic() + 30  # far off: it starts at once
with make_engine(sys.argv[1], pool_size=1, max_overflow=0).connect() as watcher:
    while not running(watcher):  # each query yields to the greenlet starting the slow one
        assert time.monotonic() < deadline, "the slow statement never started"
waiting.kill()  # as gunicorn's graceful timeout, or a gevent Timeout, ends a request
assert waiting.dead
with engine.connect() as conn:  # the pool's only connection: the interrupted one must not be it
    answer, backend = conn.exec_driver_sql("SELECT 41 + 1, pg_backend_pid()").one()
    # The interrupted backend is still in its pg_sleep: a query on it would have waited that out.
    print(answer, "new" if backend != slow_backend[0] else "interrupted")
"""


def test_a_request_interrupted_while_waiting_on_postgresql_leaves_no_broken_connection(runtime: Any) -> None:
    """A greenlet killed mid-statement: psycopg2 closes that connection, the pool replaces it, and
    the next request (on a pool of one) gets a working connection at once, not the stuck one."""
    done = subprocess.run([sys.executable, "-c", INTERRUPTED, runtime.settings.database_url], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # Not on the interrupted connection (its pg_sleep still running), nor after the pool's 2 s
    # timeout for a connection never given back (that raises: a non-zero exit above).
    assert done.stdout.split() == ["42", "new"]


def _workers(control_socket: Path) -> set[int]:
    """The web process's worker pids, from gunicorn's control socket."""
    from gunicorn.ctl.client import ControlClient

    with ControlClient(str(control_socket), timeout=60) as ctl:
        return {w["pid"] for w in ctl.send_command("show workers")["workers"]}


def _workers_now(control_socket: Path) -> set[int]:
    """``_workers``, or none while the master cannot answer (it resets the control connection while
    a reload replaces its workers)."""
    from gunicorn.ctl.client import ControlClientError

    try:
        return _workers(control_socket)
    except ControlClientError:
        return set()


def test_a_support_sign_in_holds_on_every_worker_when_secret_key_is_unset(runtime: Any, tmp_path: Path) -> None:
    """Without SECRET_KEY each gunicorn worker drew its own key: a cookie signed by one worker was
    refused by the other (sign-in 303, then 200 401 401 200 ...). The key is drawn once for the web
    process, before gunicorn forks: every worker, and every worker the master starts later (here in
    place of workers that died), accepts it."""
    import uuid

    token = "sup_" + uuid.uuid4().hex
    ctl = tmp_path / "gunicorn.ctl"
    with web_process(runtime.settings, tmp_path, WEB_CONCURRENCY="2", SECRET_KEY="",
                     SUPPORT_TOKENS=f"alice:{token}") as web:
        page = f"{web.base}/support/lifting"
        signed_in = requests.post(f"{web.base}/support/login", data={"token": token, "next": "/support/lifting"},
                                  allow_redirects=False, timeout=10)
        assert signed_in.status_code == 303
        cookies = signed_in.cookies
        # A new connection each time: either worker may answer.
        assert [requests.get(page, cookies=cookies, timeout=10).status_code for _ in range(20)] == [200] * 20

        before = _workers(ctl)
        assert len(before) == 2
        for pid in before:  # the master starts a new worker for each that dies
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: len(_workers_now(ctl) - before) == 2, timeout=60, interval=0.2,
                 message="two new workers in place of the dead ones")
        assert [requests.get(page, cookies=cookies, timeout=10).status_code for _ in range(10)] == [200] * 10


def _raw(base: str, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` as it is and read the whole answer: (status, body)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_a_chunked_body_gunicorn_cannot_read_is_a_400_naming_it_on_every_route_that_reads_one(
        runtime: Any, tmp_path: Path) -> None:
    """A chunk size that is no hex number, or a chunk without its CRLF: gunicorn raises its own
    ParseException from the body's read (werkzeug turns an OSError into a 400, not this), and every
    route that reads a body answered 500 'unexpected error'."""
    service = "svc-chunked-" + os.urandom(6).hex()
    json = b"Content-Type: application/json\r\n"
    webhook = b"POST /webhooks/stripe HTTP/1.1\r\nStripe-Signature: t=1,v1=00\r\n" + json
    pay = f"POST /pay-bad-debt HTTP/1.1\r\nAuthorization: Bearer {service}\r\nIdempotency-Key: k\r\n".encode() + json
    rollout = f"POST /ops/rollout HTTP/1.1\r\nAuthorization: Bearer {service}\r\n".encode() + json
    login = b"POST /support/login HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    with web_process(runtime.settings, tmp_path, WEB_CONCURRENCY="1", SERVICE_TOKENS=service) as web:
        for start in (webhook, pay, rollout, login):
            for chunks in (b"zz\r\nabc\r\n0\r\n\r\n", b"3\r\nabcXX0\r\n\r\n"):
                request = start + b"Host: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks
                status, body = _raw(web.base, request)
                assert status == 400, (start, chunks, status, body[:300])
                assert b"chunked" in body, body[:300]
        scraped = requests.get(f"{web.base}/metrics", timeout=5).text
    assert 'dunning_webhooks_rejected_total{reason="malformed"} 2.0' in scraped
