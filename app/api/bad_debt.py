"""POST /pay-bad-debt (SERVICE_TOKENS): the isolated bad-debt payment, see app/payments/bad_debt.py."""

from __future__ import annotations

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue

from app.api.body import json_body
from app.auth import require_service_token
from app.payments.bad_debt import pay_bad_debt
from app.web import celery_app, runtime

bp = Blueprint("bad_debt", __name__)


@bp.post("/pay-bad-debt")
@require_service_token
def pay() -> ResponseReturnValue:
    body = json_body()
    if body is None:
        return jsonify(error="invalid_body", reason='the body must be JSON {"account_id", "amount"}'), 400
    answer = pay_bad_debt(runtime(), celery_app(), body, request.headers.get("Idempotency-Key"))
    return jsonify(answer.body), answer.status, answer.headers
