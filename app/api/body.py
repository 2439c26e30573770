"""The JSON body of a request, read so that no body a caller can send turns into a 500."""

from __future__ import annotations

from typing import Any

from flask import request
from werkzeug.exceptions import BadRequest


class InvalidJSON(BadRequest):
    """A body that is JSON but cannot be read; the description says why (app.errors answers 400
    with it as the reason)."""


def json_body() -> Any:
    """The decoded JSON body; None when there is none or it is not JSON (as get_json(silent=True)).

    Raises InvalidJSON for a body nested too deeply to decode: json.loads recurses once per level and
    raises RecursionError (not a ValueError, so get_json's silent mode lets it through) somewhere
    below a thousand levels, long before the body size limit."""
    try:
        return request.get_json(silent=True)
    except RecursionError:
        raise InvalidJSON("the JSON body is nested too deeply to read") from None
