"""A fake Account Management: ``PUT /accounts/<id>/entitlements`` and ``POST /accounts/<id>/cancellations``.

Modes: ``up`` (200), ``failing`` (503), ``down`` (the port refuses connections: the server is
stopped and later started again on the same port), ``slow`` (answers after ``delay`` seconds).
``answer_raw(account, status, body)`` answers that account's requests with those bytes as they are,
not JSON (what a proxy in front of Account Management may send). ``before_answer(request)``, when
set, runs while a request waits for its answer: what happens elsewhere while Account Management
takes its time. It records every request it answered 2xx, in arrival order, with its Idempotency-Key.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote

from tests.fakes.server import Answer, FakeServer


@dataclass
class Received:
    method: str
    account_id: str
    kind: str  # entitlements | cancellations
    body: dict[str, Any]
    idempotency_key: str | None


@dataclass
class FakeAccountManagement:
    mode: str = "up"
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    refused_with_5xx: int = 0
    raw_answers: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # account -> (status, body)
    before_answer: Callable[[Received], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _release: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.server = self._server()
        self._port = self.server.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def down(self) -> None:
        """Connections refused: nothing listens on the port any more."""
        self.server.stop()
        self.mode = "down"

    def up(self) -> None:
        if self.mode == "down":
            # Same port again, so the relay's configured URL keeps working.
            self.server = self._server(port=self._port).start()
        self.mode = "up"

    def answer_raw(self, account_id: str, status: int, body: bytes) -> None:
        """Answer this account's requests with ``status`` and ``body`` byte for byte, from now on."""
        with self._lock:
            self.raw_answers[account_id] = (status, body)

    def entitlements(self, account_id: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.account_id == account_id and r.kind == "entitlements"]

    def for_account(self, account_id: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.account_id == account_id]

    def _server(self, port: int = 0) -> FakeServer:
        server = FakeServer(self._handle, port=port)
        server.httpd.RequestHandlerClass = _raw_capable(server.httpd.RequestHandlerClass, self._raw_answer)
        return server

    def _raw_answer(self, path: str) -> tuple[int, bytes] | None:
        parts = path.strip("/").split("/")
        with self._lock:
            return self.raw_answers.get(unquote(parts[1])) if len(parts) == 3 else None

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer | None:
        parts = path.strip("/").split("/")
        valid = (len(parts) == 3 and parts[0] == "accounts"
                 and ((method == "PUT" and parts[2] == "entitlements")
                      or (method == "POST" and parts[2] == "cancellations")))
        if not valid:
            return 404, {}, {"error": "not_found"}
        request = Received(method, unquote(parts[1]), parts[2], json.loads(body or b"{}"),
                           headers.get("idempotency-key"))
        if self.before_answer is not None:
            self.before_answer(request)
        if self.mode == "slow":
            self._release.wait(self.delay)
        if self.mode == "failing":
            with self._lock:
                self.refused_with_5xx += 1
            return 503, {}, {"error": "unavailable"}
        with self._lock:
            self.received.append(request)
        return 200, {}, {"ok": True}

    def __enter__(self) -> FakeAccountManagement:
        self.server.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._release.set()
        if self.mode != "down":
            self.server.stop()


def _raw_capable(handler: Any,
                 raw_for: Callable[[str], tuple[int, bytes] | None]) -> type[BaseHTTPRequestHandler]:
    """FakeServer's request handler, except that a request ``raw_for(path)`` has an answer for gets
    it byte for byte: FakeServer only sends JSON, which cannot carry a raw NUL byte."""
    serve_json = handler._serve

    class RawHandler(handler):
        def _serve(self) -> None:
            raw = raw_for(self.path)
            if raw is None:
                serve_json(self)
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)  # the request's body, unread otherwise
            status, data = raw
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

    return RawHandler
