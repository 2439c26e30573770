"""Bearer-token authentication for the service and support endpoints.

Tokens are compared in constant time against every configured token, so the time taken says
nothing about how much of a guess was right.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from functools import wraps
from typing import Any, TypeVar

from flask import g, jsonify, request

from app.web import runtime

F = TypeVar("F", bound=Callable[..., Any])


def bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return _as_sent(token.strip())


def _as_sent(value: str) -> str:
    """A header's text as the client wrote it. WSGI servers (gunicorn) hand a header over as the
    latin-1 characters of its bytes, and clients send text as UTF-8: a token configured with a
    non-ASCII character ("tökén") arrives as "tÃ¶kÃ©n" and never matched. Bytes that are no UTF-8
    (or a value already decoded, as a test client passes it) stay as they came."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def match_token(presented: str | None, tokens: Iterable[str]) -> str | None:
    """The configured token equal to ``presented`` (constant-time per comparison), else None."""
    if not presented:
        return None
    found = None
    candidate = presented.encode()
    for token in tokens:
        if hmac.compare_digest(candidate, token.encode()):
            found = token
    return found


def unauthorized(realm: str) -> Any:
    response = jsonify(error="unauthorized", reason=f"a valid bearer token for {realm} is required")
    response.status_code = 401
    response.headers["WWW-Authenticate"] = f'Bearer realm="{realm}"'
    return response


def require_service_token(view: F) -> F:
    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tokens = runtime().settings.service_tokens
        token = match_token(bearer_token(), tokens)
        if token is None:
            return unauthorized("service")
        g.actor = tokens[token]
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
