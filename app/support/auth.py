"""Support authentication: a SUPPORT_TOKENS bearer token, or a session cookie from the sign-in form.

The session keeps the actor and an HMAC of the token keyed with SECRET_KEY (_token_mac), never the
token itself nor a plain hash of it; on every request it must still match a configured token, so
removing a token from SUPPORT_TOKENS ends its sessions. Tokens and MACs are compared in constant
time (app.auth.match_token). A session lasts SESSION_MAX_AGE from its sign-in at most (CLOCK_LEAD
less by the clock of the host that signed it in: see _fresh), however it is used, and ends when it
signs out (or signs in again, which replaces it): the cookie is signed, not stored, so the server
remembers the random ids of sessions ended (support_session_ended) for as long as they could
otherwise last, and a copy of an ended session's cookie is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from functools import wraps
from typing import Any, TypeVar

from flask import current_app, g, jsonify, request, session
from sqlalchemy import Connection

from app.auth import bearer_token, match_token, unauthorized
from app.db import unit_of_work
from app.domain.snapshot import MAX_CLOCK_LEAD
from app.support import audit
from app.web import runtime

F = TypeVar("F", bound=Callable[..., Any])

SESSION_KEY = "support"
CSRF_HEADER = "X-Support-CSRF"
SESSION_MAX_AGE = 12 * 3600  # seconds: a working day; then the support form asks for the token again
# How far ahead of a web host's clock another's may run (the fleet's rule between its own hosts): a
# session signed in on a host ahead is dated in the future on the others.
CLOCK_LEAD = int(MAX_CLOCK_LEAD.total_seconds())


# The session's field for the token's MAC. Sessions signed in before it held "digest", a plain SHA-256
# of the token: they are no sessions any more (signing in again replaces them).
TOKEN_MAC = "token_mac"
_MAC_LABEL = b"dunning support session token\0"  # this key's one use besides signing the cookie


def _token_mac(token: str) -> str:
    """What the session holds for its token. The cookie is signed, not encrypted: anyone with a copy
    reads it. A plain hash there let a leaked cookie check guesses of a weak token offline; keyed with
    SECRET_KEY (which the cookie's holder does not have), it tells nothing about the token."""
    key = current_app.secret_key
    raw = key if isinstance(key, bytes) else str(key or "").encode()
    return hmac.new(raw, _MAC_LABEL + token.encode(), hashlib.sha256).hexdigest()


def _tokens() -> Mapping[str, str]:
    tokens: Mapping[str, str] = runtime().settings.support_tokens
    return tokens


def actor_for_token(token: str | None) -> str | None:
    tokens = _tokens()
    found = match_token(token, tokens)
    return tokens[found] if found is not None else None


def _session_actor() -> str | None:
    held = session.get(SESSION_KEY)
    if not isinstance(held, dict) or not isinstance(held.get(TOKEN_MAC), str) or not _fresh(held.get("at")):
        return None
    tokens = _tokens()
    by_mac = {_token_mac(t): t for t in tokens}
    found = match_token(held[TOKEN_MAC], by_mac)
    if found is None or _ended(held.get("sid")):
        return None
    return tokens[by_mac[found]]


def _ended(session_id: object) -> bool:
    """Signed out of (or without an id: from before sessions had one)."""
    if not isinstance(session_id, str) or not session_id:
        return True
    with runtime().engine.connect() as conn:
        return conn.exec_driver_sql("SELECT 1 FROM support_session_ended WHERE session_id = %(sid)s",
                                    {"sid": session_id}).first() is not None


def _fresh(signed_in_at: object) -> bool:
    """Signed in less than SESSION_MAX_AGE ago (a session without the time predates it: not fresh)."""
    if not isinstance(signed_in_at, int) or isinstance(signed_in_at, bool):
        return False
    # The web processes' clocks (on several hosts) may differ by up to CLOCK_LEAD: a sign-in dated that
    # much in the future holds. Its end is brought forward as much, so that no host's lead makes a
    # session last longer than SESSION_MAX_AGE (nor a copy of its cookie replayed later): dated by a
    # host CLOCK_LEAD ahead it ends SESSION_MAX_AGE after it really began, on a host as far behind it
    # ends CLOCK_LEAD earlier, and on the host that signed it in at SESSION_MAX_AGE - CLOCK_LEAD.
    age = time.time() - signed_in_at
    return -CLOCK_LEAD <= age < SESSION_MAX_AGE - CLOCK_LEAD


def _held_session_id() -> str | None:
    """The id of the session this browser's (signed) cookie holds, valid here or not: one over by
    this host's clock may not be by another's (up to CLOCK_LEAD behind: _fresh), where a copy of the
    cookie would go on working. Signing out or in again ends it whatever this host thinks of it."""
    held = session.get(SESSION_KEY)
    sid = held.get("sid") if isinstance(held, dict) else None
    return sid if isinstance(sid, str) and sid else None


def sign_in(token: str) -> str | None:
    """Start a session for a valid support token, audited (sign_in) in the transaction that ends
    the session it replaces: the actor, else None."""
    actor = actor_for_token(token)
    if actor is None:
        return None
    replaced = _held_session_id()
    with unit_of_work(runtime().engine) as conn:
        if replaced is not None:
            # The session this one replaces ends too: signing out later would end only the new one.
            # Also when over by this host's clock (_held_session_id).
            _end(conn, replaced)
        audit.record(conn, actor, "sign_in", None, {"remote_addr": request.remote_addr})
    # Set once recorded: had the database refused, the browser would be signed in (the cookie goes
    # out with the error's answer too) with no sign_in in the audit log.
    session.clear()
    session[SESSION_KEY] = {TOKEN_MAC: _token_mac(token), "actor": actor, "csrf": secrets.token_urlsafe(24),
                            "at": int(time.time()), "sid": secrets.token_urlsafe(18)}
    return actor


def sign_out() -> str | None:
    """End this browser's session, everywhere a copy of its cookie is, and audit it (sign_out) in
    the same transaction: the actor it was, else None (no session, or one already over)."""
    actor = _session_actor()
    held = session.get(SESSION_KEY)
    if actor is None or not isinstance(held, dict):
        over = _held_session_id()
        if over is not None:  # over by this host's clock, perhaps not by others' (_held_session_id)
            with unit_of_work(runtime().engine) as conn:
                _end(conn, over)  # nothing to audit: no session was signed out of here
        session.pop(SESSION_KEY, None)
        return None
    with unit_of_work(runtime().engine) as conn:
        _end(conn, held["sid"])
        audit.record(conn, actor, "sign_out", None, {"remote_addr": request.remote_addr})
    # Dropped once recorded: had the database refused, the browser keeps its session to sign out of
    # again (dropped first, signing out again found nothing while a copy of the cookie went on).
    session.pop(SESSION_KEY, None)
    return actor


def _end(conn: Connection, session_id: str) -> None:
    """Record the session as ended: refused from then on, whoever holds a copy of its cookie."""
    conn.exec_driver_sql("INSERT INTO support_session_ended (session_id) VALUES (%(sid)s) ON CONFLICT DO NOTHING",
                         {"sid": session_id})
    # Only sessions that could still be within their lifetime need remembering (the database's clock
    # may differ from the web hosts' by CLOCK_LEAD: that much on top).
    conn.exec_driver_sql("DELETE FROM support_session_ended "
                         "WHERE ended_at < now() - make_interval(secs => %(age)s)",
                         {"age": SESSION_MAX_AGE + CLOCK_LEAD})


def csrf_token() -> str | None:
    held = session.get(SESSION_KEY)
    return held.get("csrf") if isinstance(held, dict) else None


def authenticate() -> tuple[str | None, str | None]:
    """(actor, how): how is "bearer" or "session"."""
    presented = bearer_token()
    if presented is not None:
        return actor_for_token(presented), "bearer"
    actor = _session_actor()
    return (actor, "session") if actor is not None else (None, None)


def require_support_token(view: F) -> F:
    """401 without a valid support token or session. Cookie-authenticated writes must also carry
    the session's CSRF token in a header (a form on another site cannot set headers)."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        actor, how = authenticate()
        if actor is None:
            return unauthorized("support")
        if how == "session" and request.method not in ("GET", "HEAD", "OPTIONS"):
            # Compared as bytes: compare_digest raises TypeError on a str with non-ASCII characters,
            # which a header may hold (HTTP headers arrive as latin-1).
            expected = (csrf_token() or "").encode()
            sent = request.headers.get(CSRF_HEADER, "").encode()
            if not expected or not secrets.compare_digest(sent, expected):
                return jsonify(error="forbidden",
                               reason=f"a cookie session must send its {CSRF_HEADER} header on writes"), 403
        g.actor = actor
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
