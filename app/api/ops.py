"""Operator views of work that is behind or failed (SERVICE_TOKENS):

* ``GET /ops/stuck-events?state=retrying|dead|resolved&account_id=&limit=``: stuck work and counts;
* ``POST /ops/stuck-events/<id>/redrive``: send a stuck (even dead) task again now, audited with the
  principal (stuck.redrive);
* ``GET /ops/outbox``: the relay's backlog, its oldest pending age and the oldest rows.
"""

from __future__ import annotations

from flask import Blueprint, g, jsonify, request
from flask.typing import ResponseReturnValue

from app import stuck_work
from app.api.params import whole_number
from app.auth import require_service_token
from app.dispatch import BrokerUnavailable
from app.outbox.backlog import backlog
from app.web import celery_app, runtime

bp = Blueprint("ops", __name__)

MAX_LIMIT = 500


def _bad_request(reason: str) -> ResponseReturnValue:
    return jsonify(error="bad_request", reason=reason), 400


def _limit(default: int) -> int | None:
    return whole_number(request.args.get("limit"), default, 1, MAX_LIMIT)


@bp.get("/ops/stuck-events")
@require_service_token
def stuck_events() -> ResponseReturnValue:
    state = request.args.get("state") or None
    if state is not None and state not in stuck_work.STATES:
        return _bad_request(f"state must be one of {', '.join(stuck_work.STATES)}")
    limit = _limit(100)
    if limit is None:
        return _bad_request(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    # An account id is any text, "" too (README "Account ids in URLs"): ?account_id= is the account "",
    # as the support page's ?id= is; only no account_id at all lists every account's work.
    named = request.args.getlist("account_id")
    if len(named) > 1:
        return _bad_request("name the account once, as account_id=<account id> (query-encoded)")
    account_id = named[0] if named else None
    with runtime().engine.connect() as conn:
        items = stuck_work.list_stuck(conn, state, account_id, limit)
        totals = stuck_work.counts(conn)
    return jsonify(counts=totals, stuck_events=items)


@bp.post("/ops/stuck-events/<int:stuck_id>/redrive")
@require_service_token
def redrive(stuck_id: int) -> ResponseReturnValue:
    try:
        task_id = stuck_work.redrive_one(runtime().engine, celery_app(), stuck_id, actor=g.actor)
    except BrokerUnavailable:
        return jsonify(error="unavailable", reason="the broker did not accept the task; retry later"), 503
    if task_id is None:
        return jsonify(error="not_found", reason=f"no unresolved stuck event {stuck_id}"), 404
    return jsonify(id=stuck_id, task_id=task_id, state="retrying"), 202


@bp.get("/ops/outbox")
@require_service_token
def outbox() -> ResponseReturnValue:
    limit = _limit(10)
    if limit is None:
        return _bad_request(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    with runtime().engine.connect() as conn:
        return jsonify(backlog(conn, sample=limit))
