"""Operators' view of the staged remediation rollout and the payment-flow guard (SERVICE_TOKENS).

GET  /ops/rollout   stage, hold, last gate decision, health, history, named accounts that do not exist
POST /ops/rollout   {"action": "advance|hold|rollback|resume", "reason": "...", "actor": "...",
                     "from_stage": "...", "revision": N}  (the stage the change was decided from, required to
                     advance; the revision GET showed, the change then made at that revision only)
                    or {"action": "name", "accounts": [...], "reason": "...", "actor": "...",
                        "from_stage": "...", "revision": N}  (both optional: the naming made there only;
                        named ids with no account are a warning in the answer, not a refusal)
GET  /ops/lifting   accounts in lifting longer than the guard window

A change is recorded with the authenticated principal as its actor (g.actor, set by
require_service_token). "actor" in the body is optional and only the caller's word: when it names
someone else it is kept beside the principal, as "requested_by" in the audit_log row's detail,
never in the actor's place.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, g, jsonify, request
from flask.typing import ResponseReturnValue

from app.api.body import json_body
from app.api.params import whole_number
from app.auth import require_service_token
from app.db import unit_of_work
from app.domain.rollout import health_since, rollout_policy
from app.rollout import store
from app.rollout.gate import measure
from app.sweep.lifting import count_stuck_in_lifting, stuck_in_lifting
from app.web import runtime

bp = Blueprint("rollout", __name__)

POST_ACTIONS = (*store.ACTIONS, "name")


def _bad(reason: str) -> ResponseReturnValue:
    return jsonify(error="bad_request", reason=reason), 400


def _text_problem(value: str) -> str | None:
    """What keeps ``value`` from being stored as text (None when nothing does). The named accounts
    go into a jsonb column, which refuses \\u0000 (a DataError, a 500 before this check), and no
    UTF-8 text holds a lone surrogate."""
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text (a lone surrogate)"
    return None


def _view(conn: Any, now: datetime) -> dict[str, Any]:
    state = store.read_state(conn)
    health = measure(conn, health_since(state.status, rollout_policy(runtime().policy.extra), now), state.stage,
                     state.stage_revision)
    return {**state.to_json(), "named_accounts_missing": store.missing_accounts(conn, state.named_accounts),
            "health": health.to_json(), "history": store.history(conn, 20)}


@bp.get("/ops/rollout")
@require_service_token
def rollout_status() -> ResponseReturnValue:
    now = datetime.now(UTC)
    with runtime().engine.connect() as conn:
        return jsonify(_view(conn, now))


@bp.post("/ops/rollout")
@require_service_token
def rollout_change() -> ResponseReturnValue:
    body = json_body()
    if not isinstance(body, dict):
        return _bad("the body must be a JSON object: {\"action\", \"reason\", \"actor\"}")
    action = body.get("action")
    if action not in POST_ACTIONS:
        return _bad(f"action must be one of {', '.join(POST_ACTIONS)}")
    reason, stated = body.get("reason"), body.get("actor")
    if not isinstance(reason, str) or not reason.strip():
        return _bad("reason is required: every rollout change is audited with why")
    actor: str = g.actor  # who authenticated; the body's "actor" is only what the caller says
    requested_by = None
    if stated is not None:
        if not isinstance(stated, str) or not stated.strip():
            return _bad("actor must be a non-empty string")
        problem = _text_problem(stated) or ("is too long (at most 200 characters)" if len(stated) > 200 else None)
        if problem:
            return _bad(f"actor {problem}")
        requested_by = stated.strip() if stated.strip() != actor else None
    # The stage the caller decided from (GET's "stage" or "stage_label") and the revision GET showed: the
    # change (a naming too) is made only there, so an advance racing the gate's (or another one) widens
    # once, not twice, and of two namings decided at one revision the second is refused, not lost.
    from_stage = body.get("from_stage")
    if from_stage is not None and not isinstance(from_stage, str):
        return _bad("from_stage must be a stage, as GET /ops/rollout shows it (e.g. \"5\")")
    revision = body.get("revision")
    if revision is not None and (isinstance(revision, bool) or not isinstance(revision, int)):
        return _bad("revision must be the rollout's revision as GET /ops/rollout shows it (a whole "
                    "number)")
    now = datetime.now(UTC)
    try:
        with unit_of_work(runtime().engine) as conn:
            if action == "name":
                accounts = body.get("accounts")
                if not isinstance(accounts, list) or not all(isinstance(a, str) for a in accounts):
                    return _bad("accounts must be a list of account ids")
                if len(accounts) > 10_000:
                    return _bad("at most 10000 named accounts")
                unfit = next((p for p in map(_text_problem, accounts) if p), None)
                if unfit is not None:
                    return _bad(f"accounts must be account ids: one {unfit}")
                store.set_named_accounts(conn, accounts, actor, reason, now, requested_by, from_stage=from_stage,
                                         revision=revision)
            else:
                store.change(conn, action, actor, reason, now, requested_by=requested_by, from_stage=from_stage,
                             revision=revision)
            view = _view(conn, now)
            if action == "name" and view["named_accounts_missing"]:
                # a warning, not a refusal: an account may be created later (remediated from then on)
                view["warnings"] = [store.missing_warning(view["named_accounts_missing"])]
    except store.RolloutInputError as exc:  # the store's own input checks (a reason too long)
        return _bad(str(exc))
    except store.RolloutError as exc:  # a change the current state does not allow
        return jsonify(error="conflict", reason=str(exc)), 409
    return jsonify(view)


@bp.get("/ops/lifting")
@require_service_token
def lifting() -> ResponseReturnValue:
    rt = runtime()
    now = datetime.now(UTC)
    limit = whole_number(request.args.get("limit"), 100, 1, 1000)
    if limit is None:
        return _bad("limit must be a whole number from 1 to 1000")
    with rt.engine.connect() as conn:
        accounts = stuck_in_lifting(conn, rt.policy.guard_window_minutes, now, limit)
        total = count_stuck_in_lifting(conn, rt.policy.guard_window_minutes, now)
    return jsonify(guard_window_minutes=rt.policy.guard_window_minutes, count=total, accounts=accounts)
