"""POST /webhooks/stripe: a thin entrypoint over verify and ingest."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from app import metrics
from app.web import celery_app, runtime
from webhooks.ingest import ingest
from webhooks.mirror import NotAStripeEvent
from webhooks.verify import BadWebhook, verify_and_parse

bp = Blueprint("webhooks", __name__)

MAX_BODY = 512 * 1024  # Stripe events are far smaller; anything larger is not one.


@bp.post("/webhooks/stripe")
def stripe_webhook() -> ResponseReturnValue:
    if (request.content_length or 0) > MAX_BODY:
        metrics.WEBHOOKS_REJECTED.labels("too_large").inc()
        return jsonify(error="bad_request", reason="body too large for a Stripe event"), 413
    body = request.get_data(cache=False)
    rt = runtime()
    try:
        event, text = verify_and_parse(body, request.headers.get("Stripe-Signature"),
                                       rt.settings.stripe_webhook_secret)
        result = ingest(rt.engine, celery_app(), event, text)
    except (BadWebhook, NotAStripeEvent) as exc:
        current_app.logger.info("webhook rejected: %s", exc)
        metrics.WEBHOOKS_REJECTED.labels(getattr(exc, "code", "not_event")).inc()
        return jsonify(error="bad_request", reason=str(exc)), 400
    metrics.WEBHOOKS_RECEIVED.labels(result.type, result.state).inc()
    return jsonify(result.to_json()), 200
