"""What Account Management's answer to one outbox row says: whether it refused the request as wrong,
and a short reason to record on the row (read by operators, so nothing secret in it)."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

EXCERPT_LIMIT = 200  # characters of an answer's body kept as the reason
# Characters of an answer read for the reason: an answer may be megabytes (a proxy's page, an echo),
# and the reason is its beginning anyway.
SCAN_LIMIT = 20 * EXCERPT_LIMIT
# 4xx answers that say "not now", not "wrong": the request timed out (408), conflicts with one still
# being processed (409: both calls are idempotent, and its usual cause is a request under the same
# Idempotency-Key still under way, one the relay gave up on), was sent too early to be safe from replay
# (425), or the client is throttled (429). Sent again later, it is taken (DESIGN 11: retried with backoff).
NOT_NOW = frozenset({408, 409, 425, 429})
# A 409 that lasts longer than this is no request still under way under the same Idempotency-Key (the
# relay gives up on a call within seconds, and Account Management processes one in minutes at most) but
# a conflict that does not pass (the subscription in another workflow): refused as wrong, so blocked
# and seen by operators. Measured from the first 409 of the row's current streak (outbox.conflict_since).
CONFLICT = 409
LASTING_CONFLICT = timedelta(hours=1)
LASTING_CONFLICT_NOTE = f"409 for over {LASTING_CONFLICT.total_seconds() / 3600:g} h: a lasting conflict"
# The fields of a JSON error body that say what was wrong, in the order they are shown; those of an
# error object nested under "error" (``{"error": {"type", "code", "message"}}``).
REASON_FIELDS = ("error", "code", "message", "detail", "reason", "title")
NESTED_REASON_FIELDS = ("type", "code", "message", "detail", "reason", "title")

_TAG = re.compile(r"<[^>]*>")
# What a credential's name contains (a query parameter, a header, a JSON field), and what may stand
# between the name and its value: ":" or "=" (percent-encoded too, in a URL), quotes, a JSON list.
_NAMED = r"token|secret|passw(?:or)?d|pwd|auth|credential|session|cookie|sig|api[_-]?key|access[_-]?key|jwt"
_SEPARATOR = r"\"?\s*(?:[:=]|%3[AaDd])\s*\[?\s*"
_VALUE = r"(?:\"[^\"]*\"|'[^']*'|[^\s,;&}\"\]]+)"
# An answer may echo the request or the proxy's view of it: credentials it quotes are masked. Each
# pattern is tried only where a word starts and never backtracks into it (a possessive ``++``), so
# the time taken grows with the text, not with the square of its longest word.
_SECRETS = (
    (re.compile(r"\b(\w++://)[^\s/@:]+:[^\s/@]*@"), r"\1***@"),  # user:password@ in a URL
    # An Authorization header's value: its scheme, whichever (Bearer, Token, ApiKey...), and what follows.
    (re.compile(r"(?i)\b((?:proxy-)?authorization" + _SEPARATOR + r"\"?)(?:[a-z][\w.-]*+\s+)?[^\s,;}\"\]]+"),
     r"\1***"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[\w.~+/=-]+"), r"\1 ***"),
    (re.compile(r"(?i)(?<![\w-])((?=[\w-]*?(?:" + _NAMED + r"))[\w-]++" + _SEPARATOR + ")" + _VALUE), r"\1***"),
    (re.compile(r"(?i)(?<![\w-])(key" + _SEPARATOR + ")" + _VALUE), r"\1***"),  # ?key= (an API key)
    (re.compile(r"\beyJ[\w-]*+\.[\w-]*+(?:\.[\w-]*+)?"), "***"),  # a JWT, named or not
)


def refused_as_wrong(status: int | None) -> bool:
    """A 4xx other than 408/409/425/429 (``NOT_NOW``): Account Management says the request itself is
    wrong (an account it does not know, a body it rejects). Sent again unchanged it will be refused
    again, and the account's later rows wait behind it. (A 409 that lasts is refused too: the relay
    tells it by the row's streak, ``LASTING_CONFLICT``.)"""
    return status is not None and 400 <= status < 500 and status not in NOT_NOW


def keeps_conflict(status: int | None) -> bool:
    """Whether an answer leaves a streak of 409s going: it says nothing about the request's conflict
    (no answer, a 5xx, or another "not now": Account Management did not get to the request). Any
    other answer (a 2xx, a 3xx, another 4xx) ends it."""
    return status is None or status >= 500 or status in NOT_NOW


def reason(body: str) -> str:
    """A short reason from an answer's body: a JSON error's own words (not the rest of what it
    echoes), else its text without markup; whitespace collapsed, credentials masked. NUL characters
    are dropped: UTF-16 read as UTF-8 puts one between each letter, and hides a credential's name."""
    body = body.replace("\x00", "")
    text = _json_reason(body)
    if text is None:
        text = body[:SCAN_LIMIT]
        text = _TAG.sub(" ", text) if text.lstrip().startswith("<") else text
    return masked(" ".join(text[:SCAN_LIMIT].split()))[:EXCERPT_LIMIT]


def masked(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def _json_reason(body: str) -> str | None:
    try:
        parsed: Any = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return None
    if not isinstance(parsed, dict):
        return None
    nested = parsed.get("error")
    said = _said(parsed, REASON_FIELDS) or (_said(nested, NESTED_REASON_FIELDS) if isinstance(nested, dict) else None)
    return said or json.dumps(parsed, separators=(",", ":"))[:SCAN_LIMIT]


def _said(error: dict[str, Any], fields: tuple[str, ...]) -> str | None:
    """An error object's own words, from ``fields``."""
    said = [str(error[k]) for k in fields if isinstance(error.get(k), str | int) and error.get(k) != ""]
    return ": ".join(dict.fromkeys(said)) if said else None  # each once: "code" often repeats "error"
