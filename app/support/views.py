"""NinjaPanel endpoints and the support page (SUPPORT_TOKENS bearer token or a signed-in session).

* ``POST /support/accounts/<id>/recompute`` -> 202 {"task_id"}: a NINJAPANEL_BUTTON recompute,
  forced (not coalesced) and with its result kept for polling; audited with the actor.
* ``GET /support/tasks/<task_id>`` -> the task's state and, when done, its result summary; EXPIRED
  (done) once its result is no longer kept, NOT_QUEUED (done) when the broker refused it.
* ``GET /support/accounts/<id>`` -> the HTML page; ``GET /support/accounts/<id>/state`` the same as JSON.
* The same three in the query form, for every account id a browser can open ("." and ".." included:
  app/account_urls.py): ``GET /support/account?id=<id>``, ``GET /support/account/state?id=<id>``,
  ``POST /support/account/recompute?id=<id>``. The page's own links, POST and refresh use this form.
* ``GET|POST /support/login``, ``POST /support/logout``: the sign-in form for browsers.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlparse

import psycopg2
import psycopg2.errors
from celery.result import AsyncResult
from flask import (
    Blueprint,
    Flask,
    Response,
    g,
    has_request_context,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.typing import ResponseReturnValue

from app.account_urls import query, raw_path, routed_suffix
from app.db import ValueRejected, unit_of_work, without_quoted_value
from app.dispatch import BrokerUnavailable, recompute_call, send_many
from app.domain.triggers import Trigger
from app.metrics import SUPPORT_SIGN_IN_FAILURES
from app.money import facts_shown, money, owed
from app.support import audit
from app.support.auth import CSRF_HEADER, authenticate, csrf_token, require_support_token, sign_in, sign_out
from app.support.queries import account_view_of
from app.support.session_cookie import SkewTolerantSessionInterface
from app.sweep.lifting import count_stuck_in_lifting, stuck_in_lifting
from app.web import celery_app, runtime

bp = Blueprint("support", __name__, url_prefix="/support")
log = logging.getLogger(__name__)


class _SecureOverHttps(SkewTolerantSessionInterface):
    """Flask's signed-cookie sessions, with the cookie marked Secure whenever the request came over
    https (or through a proxy gunicorn trusts to say so: its forwarded_allow_ips): sent over plain
    http it could be read on the way. A plain-http deployment (make run on localhost) still works,
    which a fixed SESSION_COOKIE_SECURE would break. A cookie signed on a web host a little ahead of
    this one holds (app/support/session_cookie.py)."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return super().get_cookie_secure(app) or (has_request_context() and request.is_secure)


@bp.record_once
def _cookie_policy(state: Any) -> None:
    # The session cookie authenticates support writes: never send it on cross-site requests.
    if not state.app.config.get("SESSION_COOKIE_SAMESITE"):
        state.app.config["SESSION_COOKIE_SAMESITE"] = "Strict"
    state.app.config["SESSION_COOKIE_HTTPONLY"] = True
    state.app.session_interface = _SecureOverHttps()


# The page runs only its own script (support.js) and styles inline; nothing of it is framed by another
# site (the Recompute button under a decoy), cached (account data, the session's CSRF token) or sniffed.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                "img-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                                "frame-ancestors 'none'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@bp.after_app_request
def _security_headers(response: Response) -> Response:
    # Every answer under /support, a 404 or 405 too: when no route matched, no support view (nor the
    # blueprint's own after_request) ran, and the answer would go without them.
    if request.path == bp.url_prefix or request.path.startswith(f"{bp.url_prefix}/"):
        for name, value in SECURITY_HEADERS.items():
            response.headers[name] = value
    return response


def _not_found(account_id: str) -> ResponseReturnValue:
    return jsonify(error="not_found", reason=f"no account {account_id!r}"), 404


def _account_exists(account_id: str) -> bool:
    with runtime().engine.connect() as conn:
        return conn.exec_driver_sql("SELECT 1 FROM subs_account WHERE account_id = %(a)s",
                                    {"a": account_id}).first() is not None


def _queried_account() -> str | None:
    """The account the query form names (``?id=<id>``, percent-encoded; "" is an id too), or None
    unless it names exactly one."""
    named = request.args.getlist("id")
    return named[0] if len(named) == 1 else None


def _no_account_named() -> ResponseReturnValue:
    return jsonify(error="bad_request", reason="name the account once, as ?id=<account id> (percent-encoded)"), 400


def page_url(account_id: str) -> str:
    """The account's support page, in the form that every browser sends as it is (app/account_urls.py)."""
    return f"{url_for('support.account_page_by_query')}?{query(account_id)}"


@bp.app_template_global("support_page_url")
def _support_page_url(account_id: str) -> str:
    return page_url(account_id)


# Amounts as support reads them (app/money.py): "50.00 USD", never Stripe's "5000 usd".
bp.add_app_template_global(money, "money")
bp.add_app_template_global(owed, "owed")
bp.add_app_template_global(facts_shown, "facts_shown")


@bp.post("/accounts/<account:account_id>/recompute", merge_slashes=False)  # any id: app/account_urls.py
@require_support_token
def recompute(account_id: str) -> ResponseReturnValue:
    if not routed_suffix("recompute"):  # "x%2Frecompute": a POST to the page of the account "x/recompute"
        return jsonify(error="method_not_allowed", reason="the account page takes no POST"), 405
    return _recompute(account_id)


@bp.post("/account/recompute")
@require_support_token
def recompute_by_query() -> ResponseReturnValue:
    account_id = _queried_account()
    return _no_account_named() if account_id is None else _recompute(account_id)


def _recompute(account_id: str) -> ResponseReturnValue:
    if not _account_exists(account_id):
        return _not_found(account_id)
    actor: str = g.actor
    call = recompute_call(account_id, Trigger.NINJAPANEL_BUTTON.value, cause=f"support:{actor}", coalesced=False,
                          keep_result=True)
    # Audited before it is queued: no recompute runs that the log does not name its actor for.
    with unit_of_work(runtime().engine) as conn:
        entry = audit.record(conn, actor, "recompute", account_id,
                             {"task_id": call.task_id, "trigger": Trigger.NINJAPANEL_BUTTON.value})
    try:
        send_many(celery_app(), [call])
    except BrokerUnavailable:
        with unit_of_work(runtime().engine) as conn:
            audit.add_detail(conn, entry, {"queued": False})
        return _unavailable("the task queue is unreachable; nothing was queued")
    return jsonify(task_id=call.task_id, account_id=account_id, status_url=f"/support/tasks/{call.task_id}"), 202


def _unavailable(reason: str) -> ResponseReturnValue:
    """503 with Retry-After: the page retries (the same request later is expected to work)."""
    response = jsonify(error="unavailable", reason=reason)
    response.headers["Retry-After"] = "5"
    return response, 503


@bp.get("/tasks/<task_id>")
@require_support_token
def task_status(task_id: str) -> ResponseReturnValue:
    try:
        uuid.UUID(task_id)
    except ValueError:
        return jsonify(error="not_found", reason="not a task id"), 404
    # Only tasks support started can be read here (Celery cannot tell an unknown id from a queued one).
    with runtime().engine.connect() as conn:
        task = audit.recompute_task(conn, task_id)
    if task is None:
        return jsonify(error="not_found", reason=f"no support task {task_id}"), 404
    if not task.queued:  # the button answered 503: nothing was queued, nothing will run
        return jsonify(task_id=task_id, account_id=task.account_id, state="NOT_QUEUED", done=True,
                       reason="the task queue was unreachable when it was requested: it never ran")
    try:
        body = _task_outcome(task_id)
    except Exception as exc:  # redis-py's ConnectionError or TimeoutError, kombu's, a backend not even built
        # The page polls right after the button, which answers 503 when Redis is down: so does this.
        log.warning("support task %s: the result backend did not answer: %s", task_id, exc.__class__.__name__)
        return _unavailable("the task result store is unreachable; retry later")
    if body["state"] == "PENDING" and _past_result_retention(task.age):
        body = _expired(task.requested_at)
    return jsonify(task_id=task_id, account_id=task.account_id, **body)


def _result_retention() -> timedelta | None:
    """How long the result backend keeps a task's result (Celery's result_expires: 24 h in
    tasks/factory.py), or None when kept for ever."""
    expires = celery_app().conf.result_expires
    if expires is None:
        return None
    return expires if isinstance(expires, timedelta) else timedelta(seconds=float(expires))


def _past_result_retention(age: timedelta) -> bool:
    retention = _result_retention()
    return retention is not None and age > retention


def _expired(requested_at: datetime) -> dict[str, Any]:
    """A task whose result the backend no longer has, requested longer ago than results are kept:
    Celery answers PENDING for it, as for one still queued, which it is not (the page would wait for
    ever). What it did is in the account's state and reasons, its failure in the Stuck work table."""
    hours = (_result_retention() or timedelta(0)).total_seconds() / 3600
    return {"state": "EXPIRED", "done": True, "requested_at": requested_at.isoformat(),
            "reason": f"requested more than {hours:g} h ago: its result is no longer kept (the account's page "
                      "shows what it is now)"}


def _task_outcome(task_id: str) -> dict[str, Any]:
    """The task's state, and its result or error once there is one (each read asks the backend)."""
    result = AsyncResult(task_id, app=celery_app())
    state = result.state
    body: dict[str, Any] = {"state": state, "done": state in ("SUCCESS", "FAILURE", "REVOKED")}
    if state == "SUCCESS":
        body["result"] = result.result
    elif state in ("FAILURE", "RETRY"):
        body["error"] = _error_shown(result.result)
    return body


# SQLAlchemy's first line names the driver's error: "(psycopg2.errors.InvalidTextRepresentation) ...".
_DRIVER_ERROR = re.compile(r"\(psycopg2\.errors\.(\w+)\)")


def _quotes_a_value(name: str, first: str) -> bool:
    """A data exception (SQLSTATE class 22) quotes the value refused ('invalid input syntax for type
    integer: "<value>"'), a syntax error the token it stopped at, a value's literal when the statement
    went wrong at a parameter (psycopg2 inlines them): as in the Stuck work row (tasks.failures.describe).
    The hot paths' ValueRejected (app/db.py) carries a data exception's message without its class."""
    if name == ValueRejected.__name__:
        return True
    driver = _DRIVER_ERROR.match(first)
    cls = getattr(psycopg2.errors, driver.group(1), None) if driver else None
    return isinstance(cls, type) and issubclass(cls, psycopg2.DataError | psycopg2.errors.SyntaxError)


# How Celery hands back an exception it cannot rebuild (SQLAlchemy's need more than a message):
# Exception("<class 'sqlalchemy.exc.ProgrammingError'>(['message'])").
_UNREBUILT = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>\((.*)\)", re.DOTALL)
ERROR_SHOWN_LIMIT = 500


def _error_shown(exc: object) -> str:
    """A failed task's error as support sees it: its type and the first line of its message. What
    follows (psycopg2's LINE 1 with the statement and its values, SQLAlchemy's [SQL: ...]) is for
    engineers: the worker log and the Stuck work row keep it."""
    name, message = type(exc).__name__, str(exc)
    unrebuilt = _UNREBUILT.fullmatch(message)
    if unrebuilt:
        name, message = unrebuilt.group(1), unrebuilt.group(2)
        if len(message) <= 100_000:  # longer: not parsed, only cut below as text
            with contextlib.suppress(ValueError, SyntaxError, MemoryError, RecursionError):
                args = ast.literal_eval(message)  # the exception's args, as Celery stored their repr
                message = str(args[0]) if isinstance(args, list | tuple) and args else str(args)
    first = message.strip().split("\n", 1)[0].split("[SQL:", 1)[0].strip()
    if _quotes_a_value(name, first):
        first = without_quoted_value(first)
    shown = f"{name}: {first}" if first else name
    return shown if len(shown) <= ERROR_SHOWN_LIMIT else shown[:ERROR_SHOWN_LIMIT - 3] + "..."


@bp.get("/accounts/<account:account_id>/state", merge_slashes=False)
def account_state(account_id: str) -> ResponseReturnValue:
    if not routed_suffix("state"):  # "x%2Fstate": the page of the account "x/state", not the state of "x"
        return account_page(f"{account_id}/state")
    return _account_state(account_id)


@require_support_token
def _account_state(account_id: str) -> ResponseReturnValue:
    view = account_view_of(runtime().engine, account_id, datetime.now(UTC), runtime().policy.guard_window_minutes)
    return jsonify(view) if view is not None else _not_found(account_id)


@bp.get("/account/state")
@require_support_token
def account_state_by_query() -> ResponseReturnValue:
    account_id = _queried_account()
    return _no_account_named() if account_id is None else _account_state(account_id)


@bp.get("/accounts/<account:account_id>", merge_slashes=False)
def account_page(account_id: str) -> ResponseReturnValue:
    actor, _ = authenticate()
    if actor is None:
        return render_template("support_login.html", next=_here(), error=None), 401
    return _account_page(account_id, actor)


@bp.get("/account")
def account_page_by_query() -> ResponseReturnValue:
    account_id = _queried_account()
    actor, _ = authenticate()
    if actor is None:
        # The sign-in comes back to this account's page, its address built again from the id.
        back = page_url(account_id) if account_id is not None else url_for("support.account_page_by_query")
        return render_template("support_login.html", next=back, error=None), 401
    return _no_account_named() if account_id is None else _account_page(account_id, actor)


def _account_page(account_id: str, actor: str) -> ResponseReturnValue:
    view = account_view_of(runtime().engine, account_id, datetime.now(UTC), runtime().policy.guard_window_minutes)
    if view is None:
        return render_template("support_missing.html", account_id=account_id, actor=actor), 404
    # The script POSTs and refreshes at URLs the server builds, in the query form: from a page opened
    # at /support/accounts/<id> too, and whatever the id ("." and ".." have no path a browser sends).
    return render_template("support_account.html", account_id=account_id, actor=actor, view=view,
                           page_url=page_url(account_id),
                           recompute_url=f"{url_for('support.recompute_by_query')}?{query(account_id)}",
                           csrf=csrf_token() or "", csrf_header=CSRF_HEADER)


LIFTING_LISTED = 200


@bp.get("/lifting")
def lifting_page() -> ResponseReturnValue:
    """Accounts stuck in lifting longer than the guard window (the gauge's accounts, by name)."""
    actor, _ = authenticate()
    if actor is None:
        return render_template("support_login.html", next=_here(), error=None), 401
    rt = runtime()
    now = datetime.now(UTC)
    # One REPEATABLE READ transaction: the list and how many there are in all, read at one moment.
    with rt.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
        stuck = stuck_in_lifting(conn, rt.policy.guard_window_minutes, now, LIFTING_LISTED)
        # The list shows the oldest LIFTING_LISTED: in an incident (payment outcomes lost) there are more.
        total = count_stuck_in_lifting(conn, rt.policy.guard_window_minutes, now) if len(stuck) == LIFTING_LISTED \
            else len(stuck)
    return render_template("support_lifting.html", actor=actor, stuck=stuck, total=total,
                           guard_minutes=rt.policy.guard_window_minutes)


def _here() -> str:
    """This page's path as a URL, as the client sent it: request.path is decoded, so an account id
    holding '#', '?' or '%' would come back from the sign-in form as another page, and one holding
    '/' ("x/state", its %2F decoded) as another route."""
    return raw_path() or quote(request.path)


def _safe_next(target: str | None) -> str:
    # Only back into the support pages: never an open redirect.
    try:
        parsed = urlparse(target or "")
    except ValueError:  # "Invalid IPv6 URL": a '[' or ']' in what would be the host
        return "/support/login"
    if parsed.scheme or parsed.netloc or not parsed.path.startswith("/support/"):
        return "/support/login"
    # The query stays: the query form's page names its account there (/support/account?id=..).
    return f"{parsed.path}?{parsed.query}" if parsed.query else parsed.path


# Where a browser says a request comes from (Fetch Metadata): only these may sign in. "none" is a
# request the person made (typed, bookmarked), "same-origin" this site's own form.
SIGN_IN_FROM = ("same-origin", "none")


def _from_another_origin() -> bool:
    """A sign-in form posted by a page of another origin (login CSRF: the attacker's token, sent by
    the victim's browser, signs it in as the attacker, whose name the victim's Recompute clicks are
    then audited under). Browsers say where a request comes from in Sec-Fetch-Site (Chromium, Firefox,
    Safari: all current ones); one too old to send it still sends Origin on a POST of another origin,
    compared with the Host it was sent to (its host and port: a TLS proxy in front makes the scheme
    differ; "null", an opaque origin, never matches). A request with neither (curl, a script) is no
    browser's posting of another site's form: it carries the token its sender holds. As Go's
    net/http CrossOriginProtection decides; the SameSite=Strict session cookie does not help here, as
    a browser keeps a cookie set by the answer to a cross-site POST."""
    site = request.headers.get("Sec-Fetch-Site")
    if site:
        return site.strip().lower() not in SIGN_IN_FROM
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    try:
        host = urlparse(origin.strip()).netloc
    except ValueError:
        return True
    return not host or host.lower() != request.host.lower()


@bp.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    if request.method == "GET":
        return render_template("support_login.html", next=_safe_next(request.args.get("next")), error=None)
    target = _safe_next(request.form.get("next"))
    if _from_another_origin():
        # Nothing signed in, nothing ended: the browser's own session (if any) stays as it is.
        SUPPORT_SIGN_IN_FAILURES.labels(reason="cross_origin").inc()
        log.warning("support sign-in refused from %s: sent from another site's page (Sec-Fetch-Site %s, Origin %s)",
                    request.remote_addr, request.headers.get("Sec-Fetch-Site"), request.headers.get("Origin"))
        return render_template("support_login.html", next=target,
                               error="That sign-in was sent from another site's page: sign in here."), 403
    # Blanks around a pasted token dropped, as around a bearer token (app/auth.py): a configured token
    # holds no whitespace (app/config.py refuses one), so nothing else can match.
    actor = sign_in(request.form.get("token", "").strip())
    if actor is None:
        # Seen, never the token: someone trying tokens shows in the log and on a dashboard.
        SUPPORT_SIGN_IN_FAILURES.labels(reason="token").inc()
        log.warning("support sign-in failed from %s: the token matches no support token (actor unknown)",
                    request.remote_addr)
        return render_template("support_login.html", next=target, error="That token is not valid."), 401
    return redirect(target, code=303)  # audited (sign_in) with the session's start, in one transaction


@bp.post("/logout")
def logout() -> ResponseReturnValue:
    # No CSRF check: another site making a browser sign out costs a sign-in, nothing more.
    sign_out()  # audited with the session's end, in one transaction
    return redirect("/support/login", code=303)
