"""Account ids in URLs, whatever their form: other teams create the accounts (``subs_account.account_id``
is their text), so an id may hold '/', '?', '#', '%', spaces, '+', any unicode, or be "." or "..".

* ``segment(id)``: the id as one path segment, for a URL this fleet builds (the support pages, the
  calls to Account Management): percent-encoded whole, '/' included, and "." / ".." as ``%2E`` (as
  they are, they would be dot segments that clients, proxies and servers resolve away).
* The ``account`` route converter (``/accounts/<account:account_id>/dunning``): servers decode %2F
  before routing (WSGI's PATH_INFO is decoded), so an id's '/' arrives as a '/' and the default
  converter, which stops at one, found no route. This one takes every character, so the id runs up
  to the route's fixed suffix; its routes are registered with ``merge_slashes=False`` (an id "/x" or
  "a//b" is not redirected to another account). It builds URLs with ``segment``.
* ``routed_suffix``: where one route is another's with a suffix (``/support/accounts/<id>`` and
  ``.../<id>/state``), the decoded path cannot tell the page of "x/state" from the state of "x"; the
  raw request path (gunicorn's ``RAW_URI``, werkzeug's ``REQUEST_URI``) can: "x%2Fstate" is an id.
* ``query(id)``: the id as the query ``id=...`` of the support pages' query form (``/support/account?id=``),
  the one form that reaches every account from a browser: browsers resolve the dot segments "." and
  ".." before they send a request, escaped ones (%2E) too, so no path reaches the page of "." or ".."
  there; a query they send as it is. The support pages' own links, the page's Recompute POST and its
  refresh use this form, for every account; the path form still answers as before.
"""

from __future__ import annotations

from urllib.parse import quote, unquote, urlsplit

from flask import request
from werkzeug.routing import BaseConverter


def segment(account_id: str) -> str:
    """The account id as one percent-encoded path segment."""
    if account_id in (".", ".."):
        return account_id.replace(".", "%2E")
    return quote(account_id, safe="")


def query(account_id: str) -> str:
    """The account id as the query ``id=...``: percent-encoded whole ('+' as %2B, space as %20),
    read back by any form decoder as it was. An empty id ("") is an account id too."""
    return "id=" + quote(account_id, safe="")


class AccountIdConverter(BaseConverter):
    """An account id in a route: every character, '/' included, up to what follows it in the rule."""

    regex = r"[\s\S]+?"
    part_isolating = False

    def to_url(self, value: str) -> str:
        return segment(value)


def raw_path() -> str | None:
    """The request's path as the client sent it (still percent-encoded), when the server tells it
    and it is the path that was routed (no proxy or SCRIPT_NAME rewrote it); else None."""
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI")
    if not isinstance(raw, str) or not raw:
        return None
    try:
        path = urlsplit(raw).path if "://" in raw.split("?", 1)[0] else raw.split("?", 1)[0].split("#", 1)[0]
        # WSGI strings are latin-1 spellings of the bytes: the raw path's escapes decode to the same.
        decoded = unquote(path, encoding="latin-1")
    except ValueError:
        return None
    return path if decoded == request.environ.get("SCRIPT_NAME", "") + request.environ.get("PATH_INFO", "") else None


def routed_suffix(suffix: str) -> bool:
    """Whether the request's last path segment is the route's own ``suffix`` rather than the end of
    an account id whose '/' was percent-encoded (``x%2Fstate``). True when the raw path is unknown."""
    raw = raw_path()
    return raw is None or unquote(raw.rsplit("/", 1)[-1]) == suffix
