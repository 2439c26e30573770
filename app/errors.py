"""One exception type per failure mode, turned into a JSON response here, at the edge."""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue
from gunicorn.http.errors import ParseException
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from app.db import Conflict, DatabaseUnavailable, TimedOut, ValueRejected, is_connection_error, is_timed_out

log = logging.getLogger(__name__)


def register(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> ResponseReturnValue:
        response = jsonify(error=(exc.name or "error").lower().replace(" ", "_"), reason=exc.description)
        # The exception's own headers belong to its answer (a 405's Allow, a 401's WWW-Authenticate, a
        # 416's Content-Range, a Retry-After): only its HTML Content-Type is replaced.
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers.add(name, value)
        return response, exc.code or 500

    @app.errorhandler(ParseException)
    def unreadable_body(exc: ParseException) -> ResponseReturnValue:
        # gunicorn reads a chunked body as the view reads it (request.get_json, request.form), and
        # raises its own exception for a chunk it cannot parse (a size that is no hex number, a chunk
        # without its CRLF): the caller's malformed request, not an error of ours.
        return jsonify(error="bad_request", reason=unreadable_reason(exc)), 400

    @app.errorhandler(DatabaseUnavailable)
    def db_down(exc: DatabaseUnavailable) -> ResponseReturnValue:
        return _unavailable()

    @app.errorhandler(Conflict)
    def conflict(exc: Conflict) -> ResponseReturnValue:
        log.warning("write lost a race with a concurrent one: %s", exc)
        return _lost_race()

    @app.errorhandler(TimedOut)
    def timed_out(exc: TimedOut) -> ResponseReturnValue:
        log.warning("statement cancelled after waiting too long: %s", exc)
        return _busy()

    @app.errorhandler(ValueRejected)
    def value_rejected(exc: ValueRejected) -> ResponseReturnValue:
        log.warning("value rejected by the database: %s", exc)
        return jsonify(error="unprocessable", reason="a value could not be stored; nothing was accepted"), 422

    @app.errorhandler(PoolTimeout)
    def pool_exhausted(exc: PoolTimeout) -> ResponseReturnValue:
        # A gevent worker serves many requests at once; more of them than its pool has connections
        # wait their turn, and past the pool's timeout the caller is told to come back, not sent a 500.
        log.warning("no database connection free in time: %s", exc)
        return _retry_later("every database connection is busy; retry later", seconds=1)

    @app.errorhandler(DBAPIError)
    def db_error(exc: DBAPIError) -> ResponseReturnValue:
        if is_connection_error(exc):
            log.warning("database unreachable: %s", exc.__class__.__name__)
            return _unavailable()
        if is_timed_out(exc):  # a statement run through SQLAlchemy (TimedOut: those on the DBAPI cursor)
            log.warning("statement cancelled after waiting too long: %s", _primary_message(exc))
            return _busy()
        if _lost_a_race(exc):  # a deadlock or serialization failure (Conflict: those on the DBAPI cursor)
            log.warning("write lost a race with a concurrent one: %s", _primary_message(exc))
            return _lost_race()
        if _refused_as_data(exc):
            # SQLSTATE class 22 (data exception): PostgreSQL refused a value the request brought (a
            # \u0000 in jsonb, a number out of range, text that is not a date), as ValueRejected says
            # for the statements run on the DBAPI cursor. The transaction was rolled back.
            log.warning("value refused by the database: %s", exc.orig)
            return jsonify(error="unprocessable",
                           reason=f"a value could not be stored ({_primary_message(exc)}); nothing was accepted"), 422
        log.exception("database error")
        return jsonify(error="internal_error", reason="database error; nothing was accepted"), 500

    @app.errorhandler(UnicodeEncodeError)
    def not_unicode_text(exc: UnicodeEncodeError) -> ResponseReturnValue:
        # JSON may escape half of a surrogate pair alone ("\ud800"); Python keeps it in the str, but
        # no UTF-8 text holds it, so psycopg2 cannot send it (nor PostgreSQL store it). Nothing this
        # service stores or reads back holds one: it came with the request.
        if exc.reason == "surrogates not allowed":
            return jsonify(error="bad_request",
                           reason="a value in the request is not valid Unicode text (a lone surrogate)"), 400
        return unexpected(exc)

    @app.errorhandler(ValueError)
    def nul_character(exc: ValueError) -> ResponseReturnValue:
        # psycopg2 refuses a string holding NUL before it reaches the database (PostgreSQL text has
        # no such character): an account id, a query parameter or a header the caller sent.
        if "NUL (0x00)" in str(exc):
            return jsonify(error="bad_request", reason="a value in the request contains a NUL character"), 400
        return unexpected(exc)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> ResponseReturnValue:
        log.exception("unhandled error")
        return jsonify(error="internal_error", reason="unexpected error; nothing was accepted"), 500


def unreadable_reason(exc: ParseException) -> str:
    return f"the request body cannot be read: its chunked transfer encoding is malformed ({type(exc).__name__})"


def _lost_a_race(exc: DBAPIError) -> bool:
    """SQLSTATE class 40 (transaction rollback: 40001 serialization failure, 40P01 deadlock): the
    transaction was rolled back whole, and the same request again normally goes through."""
    return str(getattr(exc.orig, "pgcode", None) or "").startswith("40")


def _refused_as_data(exc: DBAPIError) -> bool:
    return isinstance(exc, DataError) or str(getattr(exc.orig, "pgcode", None) or "").startswith("22")


def _primary_message(exc: DBAPIError) -> str:
    """PostgreSQL's one-line message (what was wrong with which value), without the statement."""
    diag = getattr(exc.orig, "diag", None)
    message = getattr(diag, "message_primary", None) or next(iter(str(exc.orig).strip().splitlines()), "refused")
    return message if len(message) <= 200 else message[:197] + "..."


def _unavailable() -> ResponseReturnValue:
    return _retry_later("database unreachable; retry later", seconds=5)


def _lost_race() -> ResponseReturnValue:
    return _retry_later("a concurrent write got in the way; retry later", seconds=1)


def _busy() -> ResponseReturnValue:
    # A row lock held past lock_timeout (5 s: a long transaction on the same account), or a statement
    # past statement_timeout: rolled back, and the same request in a few seconds normally goes through.
    return _retry_later("the database took too long (a lock this request needs was held by another transaction, "
                        "or a statement ran past its time limit); retry later", seconds=5)


def _retry_later(reason: str, seconds: int) -> ResponseReturnValue:
    """503 with Retry-After: nothing was accepted, and the same request later is expected to work."""
    response = jsonify(error="unavailable", reason=reason)
    response.headers["Retry-After"] = str(seconds)
    return response, 503
