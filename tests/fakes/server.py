"""A threaded HTTP server on an ephemeral 127.0.0.1 port, started and stopped by a context manager."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# (status, headers, body) — what a fake answers; None closes the connection without an answer.
Answer = tuple[int, dict[str, str], dict[str, Any] | None]


class FakeServer:
    """``handle(method, path, headers, body)`` answers each request; header names come lower-cased
    (HTTP's are case-insensitive)."""

    def __init__(self, handle: Callable[[str, str, dict[str, str], bytes], Answer | None], port: int = 0) -> None:
        self._handle = handle
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {name.lower(): value for name, value in self.headers.items()}
                answer = fake._handle(self.command, self.path, headers, body)
                if answer is None:
                    self.close_connection = True
                    return
                status, headers, payload = answer
                data = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        # A listening socket that never blocks: if a connection it was told of is gone before accept
        # (seen once, the suite then hung in shutdown()), the server goes back to its loop instead of
        # waiting in accept() for good.
        self.httpd.socket.setblocking(False)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        assert isinstance(host, str)  # socketserver types it str | bytes (for AF_UNIX); ours is TCP
        return f"http://{host}:{port}"

    def start(self) -> FakeServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
