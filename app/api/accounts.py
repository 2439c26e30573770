"""GET /accounts/<id>/dunning and GET /accounts/<id>/billing-history (SERVICE_TOKENS)."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue

from app import queries
from app.auth import require_service_token
from app.web import runtime

bp = Blueprint("accounts", __name__)


def _not_found(account_id: str) -> ResponseReturnValue:
    return jsonify(error="not_found", reason=f"no account {account_id!r}"), 404


@bp.get("/accounts/<account:account_id>/dunning", merge_slashes=False)  # any id: app/account_urls.py
@require_service_token
def dunning(account_id: str) -> ResponseReturnValue:
    with runtime().engine.connect() as conn:
        view = queries.dunning_view(conn, account_id)
    return jsonify(view) if view is not None else _not_found(account_id)


@bp.get("/accounts/<account:account_id>/billing-history", merge_slashes=False)
@require_service_token
def billing_history(account_id: str) -> ResponseReturnValue:
    with runtime().engine.connect() as conn:
        invoices = queries.billing_history(conn, account_id, datetime.now(UTC))
    if invoices is None:
        return _not_found(account_id)
    return jsonify(account_id=account_id, invoices=invoices)
