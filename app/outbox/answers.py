"""What Account Management's answer to one outbox row says: whether it refused the request as wrong,
and a short reason to record on the row (read by operators, so nothing secret in it)."""

from __future__ import annotations

import json
import re
from typing import Any

EXCERPT_LIMIT = 200  # characters of an answer's body kept as the reason
# 4xx answers that say "not now" (the request timed out, or the client is throttled), not "wrong".
NOT_NOW = frozenset({408, 429})
# The fields of a JSON error body that say what was wrong, in the order they are shown.
REASON_FIELDS = ("error", "code", "message", "detail", "reason", "title")

_TAG = re.compile(r"<[^>]*>")
# An answer may echo the request or the proxy's view of it: credentials it quotes are masked.
_SECRETS = (
    (re.compile(r"(\w+://)[^\s/@:]+:[^\s/@]*@"), r"\1***@"),  # user:password@ in a URL
    (re.compile(r"(?i)\b(authorization|cookie)(\"?\s*[:=]\s*\"?)(?:(?:bearer|basic|digest)\s+)?[^\s,;}\"]+"),
     r"\1\2***"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[\w.~+/=-]+"), r"\1 ***"),
    (re.compile(r"(?i)([\w-]*(?:token|secret|password|passwd|api[_-]?key|signature)[\w-]*\"?\s*[:=]\s*)"
                r"(\"[^\"]*\"|'[^']*'|[^\s,;&}]+)"), r"\1***"),
)


def refused_as_wrong(status: int | None) -> bool:
    """A 4xx other than 408/429: Account Management says the request itself is wrong (an account
    it does not know, a body it rejects). Sent again unchanged it will be refused again, and the
    account's later rows wait behind it."""
    return status is not None and 400 <= status < 500 and status not in NOT_NOW


def reason(body: str) -> str:
    """A short reason from an answer's body: a JSON error's own words (not the rest of what it
    echoes), else its text without markup; whitespace collapsed, credentials masked."""
    text = _json_reason(body)
    if text is None:
        text = _TAG.sub(" ", body) if body.lstrip().startswith("<") else body
    return masked(" ".join(text.split()))[:EXCERPT_LIMIT]


def masked(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def _json_reason(body: str) -> str | None:
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    said = [str(parsed[k]) for k in REASON_FIELDS if isinstance(parsed.get(k), str | int) and parsed.get(k) != ""]
    if said:
        return ": ".join(dict.fromkeys(said))  # each once: "code" often repeats "error"
    return json.dumps(parsed, separators=(",", ":"))
