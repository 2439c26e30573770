"""A fake Account Management: ``PUT /accounts/<id>/entitlements`` and ``POST /accounts/<id>/cancellations``.

Modes: ``up`` (200), ``failing`` (503), ``down`` (the port refuses connections: the server is
stopped and later started again on the same port), ``slow`` (answers after ``delay`` seconds).
``answer_raw(account, status, body, headers)`` answers that account's requests with those bytes as they
are, not JSON (what a proxy in front of Account Management may send), with those headers (a
``Retry-After``). ``refuse(account, status, body)`` answers that account's requests ``status`` with
that JSON body (a 404 for an account it does not know, a 422 for a request it finds wrong), or
only its entitlements of one ``dunning_version``, until ``accept(account)``. ``trickle(account)``
answers that account's requests a 200 whose headers come a byte every ``trickle_interval`` seconds,
without end (a proxy that holds the answer open), until the fake stops. ``before_answer(request)``,
when set, runs while a request waits for its answer: what happens elsewhere while Account Management
takes its time. It records every request it answered 2xx, in arrival order, with its Idempotency-Key.
Like an idempotent API (IETF draft "The Idempotency-Key HTTP Header Field", section 2.6), a request
whose Idempotency-Key is still being processed (a first request Account Management has not answered
yet: the relay gave up on it, the fake still holds it in ``before_answer`` or ``slow``) is answered
409 ``IN_PROGRESS``; ``settled(timeout)`` waits until no request is being processed.

It routes a request as an HTTP server or a proxy in front of one does: a path's dot segments ("." and
".." as they are, RFC 3986 section 5.2.4) are removed first, so ``/accounts/../entitlements`` is
``/entitlements`` (not found); ``%2E%2E`` is no dot segment and names the account "..". ``paths``
keeps every request's path as it arrived.
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

IN_PROGRESS = {"error": "idempotency_key_in_use",
               "message": "a request with this Idempotency-Key is still being processed"}


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
    raw_headers: dict[str, dict[str, str]] = field(default_factory=dict)  # account -> extra headers
    # account -> (status, body, the only dunning_version refused or None for every request)
    refusals: dict[str, tuple[int, dict[str, Any], int | None]] = field(default_factory=dict)
    trickled: set[str] = field(default_factory=set)  # accounts answered a header byte at a time
    trickle_interval: float = 0.5
    before_answer: Callable[[Received], None] | None = None
    paths: list[str] = field(default_factory=list)  # every request's path as it arrived
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _release: threading.Event = field(default_factory=threading.Event)
    # Idempotency-Keys of the requests being processed (received, not answered yet).
    _in_progress: set[str] = field(default_factory=set)
    _settled: threading.Condition = field(default_factory=threading.Condition)

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

    def answer_raw(self, account_id: str, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        """Answer this account's requests with ``status`` and ``body`` byte for byte, from now on."""
        with self._lock:
            self.raw_answers[account_id] = (status, body)
            self.raw_headers[account_id] = dict(headers or {})

    def refuse(self, account_id: str, status: int, body: dict[str, Any], dunning_version: int | None = None) -> None:
        """Answer this account's requests (or only its entitlements of ``dunning_version``) ``status``
        with ``body`` (JSON), from now on."""
        with self._lock:
            self.refusals[account_id] = (status, body, dunning_version)

    def accept(self, account_id: str) -> None:
        """Take this account's requests again (it now knows the account)."""
        with self._lock:
            self.refusals.pop(account_id, None)

    def trickle(self, account_id: str) -> None:
        """Answer this account's requests a 200 whose headers come a byte every
        ``trickle_interval`` seconds and never end: each read gets something within any read timeout."""
        with self._lock:
            self.trickled.add(account_id)

    def entitlements(self, account_id: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.account_id == account_id and r.kind == "entitlements"]

    def for_account(self, account_id: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.account_id == account_id]

    def settled(self, timeout: float = 30.0) -> bool:
        """Wait until no request is being processed (each one answered): whether it came to that."""
        with self._settled:
            return self._settled.wait_for(lambda: not self._in_progress, timeout)

    def _server(self, port: int = 0) -> FakeServer:
        server = FakeServer(self._handle, port=port)
        server.httpd.RequestHandlerClass = _raw_capable(server.httpd.RequestHandlerClass, self._raw_answer,
                                                        self._trickling)
        return server

    def _account_of(self, path: str) -> str | None:
        parts = _without_dot_segments(path).strip("/").split("/")
        return unquote(parts[1]) if len(parts) == 3 else None

    def _raw_answer(self, path: str) -> tuple[int, bytes, dict[str, str]] | None:
        account = self._account_of(path)
        with self._lock:
            raw = self.raw_answers.get(account) if account is not None else None
            return (*raw, self.raw_headers.get(account or "", {})) if raw is not None else None

    def _trickling(self, path: str) -> float | None:
        """The seconds between header bytes for a trickled account's request, else None."""
        account = self._account_of(path)
        with self._lock:
            return self.trickle_interval if account in self.trickled and not self._release.is_set() else None

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer | None:
        with self._lock:
            self.paths.append(path)
        parts = _without_dot_segments(path).strip("/").split("/")
        valid = (len(parts) == 3 and parts[0] == "accounts"
                 and ((method == "PUT" and parts[2] == "entitlements")
                      or (method == "POST" and parts[2] == "cancellations")))
        if not valid:
            return 404, {}, {"error": "not_found"}
        request = Received(method, unquote(parts[1]), parts[2], json.loads(body or b"{}"),
                           headers.get("idempotency-key"))
        key = request.idempotency_key
        if key is None:
            return self._process(request)
        with self._settled:
            if key in self._in_progress:
                return 409, {}, IN_PROGRESS
            self._in_progress.add(key)
        try:
            return self._process(request)
        finally:
            with self._settled:
                self._in_progress.discard(key)
                self._settled.notify_all()

    def _process(self, request: Received) -> Answer:
        if self.before_answer is not None:
            self.before_answer(request)
        if self.mode == "slow":
            self._release.wait(self.delay)
        if self.mode == "failing":
            with self._lock:
                self.refused_with_5xx += 1
            return 503, {}, {"error": "unavailable"}
        with self._lock:
            refusal = self.refusals.get(request.account_id)
            if refusal is not None and refusal[2] in (None, request.body.get("dunning_version")):
                return refusal[0], {}, refusal[1]
            self.received.append(request)
        return 200, {}, {"ok": True}

    def __enter__(self) -> FakeAccountManagement:
        self.server.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._release.set()
        if self.mode != "down":
            self.server.stop()


def _without_dot_segments(path: str) -> str:
    """The path with its "." and ".." segments resolved (RFC 3986 section 5.2.4), as a server would."""
    out: list[str] = []
    for segment in path.split("?", 1)[0].split("/")[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    trailing = path.split("?", 1)[0].rsplit("/", 1)[-1] in (".", "..")
    return "/" + "/".join(out) + ("/" if trailing and out else "")


def _raw_capable(handler: Any, raw_for: Callable[[str], tuple[int, bytes, dict[str, str]] | None],
                 trickle_for: Callable[[str], float | None]) -> type[BaseHTTPRequestHandler]:
    """FakeServer's request handler, except that a request ``raw_for(path)`` has an answer for gets
    it byte for byte (FakeServer only sends JSON, which cannot carry a raw NUL byte), and one
    ``trickle_for(path)`` gives an interval for gets its headers a byte at a time, for as long as
    the fake runs."""
    serve_json = handler._serve

    class RawHandler(handler):
        def _serve(self) -> None:
            raw = raw_for(self.path)
            interval = trickle_for(self.path)
            if raw is None and interval is None:
                serve_json(self)
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)  # the request's body, unread otherwise
            if interval is not None:
                self._trickle(interval)
                return
            status, data, headers = raw  # type: ignore[misc]
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _trickle(self, interval: float) -> None:
            # One header line a byte at a time: no header count or line length limit of the client
            # ends it for hours, and each read gets a byte well within its timeout.
            self.close_connection = True
            pause = threading.Event()
            try:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Still-Working: ")
                while trickle_for(self.path) is not None:
                    self.wfile.write(b"y")
                    self.wfile.flush()
                    pause.wait(interval)
            except OSError:
                return  # the client gave up on us

        do_GET = do_POST = do_PUT = do_DELETE = _serve

    return RawHandler
