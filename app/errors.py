"""One exception type per failure mode, turned into a JSON response here, at the edge."""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import DBAPIError
from werkzeug.exceptions import HTTPException

from app.db import DatabaseUnavailable, is_connection_error

log = logging.getLogger(__name__)


def register(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> ResponseReturnValue:
        return jsonify(error=(exc.name or "error").lower().replace(" ", "_"), reason=exc.description), exc.code or 500

    @app.errorhandler(DatabaseUnavailable)
    def db_down(exc: DatabaseUnavailable) -> ResponseReturnValue:
        return _unavailable()

    @app.errorhandler(DBAPIError)
    def db_error(exc: DBAPIError) -> ResponseReturnValue:
        if is_connection_error(exc):
            log.warning("database unreachable: %s", exc.__class__.__name__)
            return _unavailable()
        log.exception("database error")
        return jsonify(error="internal_error", reason="database error; nothing was accepted"), 500

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> ResponseReturnValue:
        log.exception("unhandled error")
        return jsonify(error="internal_error", reason="unexpected error; nothing was accepted"), 500


def _unavailable() -> ResponseReturnValue:
    response = jsonify(error="unavailable", reason="database unreachable; retry later")
    response.headers["Retry-After"] = "5"
    return response, 503
