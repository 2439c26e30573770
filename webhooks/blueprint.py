"""POST /webhooks/stripe: a thin entrypoint over verify and ingest."""

from __future__ import annotations

import orjson
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from gunicorn.http.errors import ParseException

from app import metrics
from app.db import ValueRejected
from app.errors import unreadable_reason
from app.web import runtime
from webhooks.ingest import Ingestor
from webhooks.mirror import NotAStripeEvent
from webhooks.verify import BadWebhook, verify_and_parse

bp = Blueprint("webhooks", __name__)

MAX_BODY = 512 * 1024  # Stripe events are far smaller; anything larger is not one.


def init_app(app: Flask, ingestor: Ingestor) -> None:
    """One ingestor per app, so per web process: its request threads share its group commit."""
    app.extensions["webhook_ingest"] = ingestor
    app.register_blueprint(bp)


@bp.post("/webhooks/stripe")
def stripe_webhook() -> ResponseReturnValue:
    if (request.content_length or 0) > MAX_BODY:
        metrics.WEBHOOKS_REJECTED.labels("too_large").inc()
        return jsonify(error="bad_request", reason="body too large for a Stripe event"), 413
    try:
        body = _body()
        event, text = verify_and_parse(body, request.headers.get("Stripe-Signature"),
                                       runtime().settings.stripe_webhook_secret)
        result = current_app.extensions["webhook_ingest"].ingest(event, text)
    except (BadWebhook, NotAStripeEvent) as exc:
        current_app.logger.info("webhook rejected: %s", exc)
        metrics.WEBHOOKS_REJECTED.labels(getattr(exc, "code", "not_event")).inc()
        return jsonify(error="bad_request", reason=str(exc)), 400
    except ValueRejected as exc:  # signed and well formed, but holding a value nothing can store
        current_app.logger.warning("webhook not storable: %s", exc)
        metrics.WEBHOOKS_REJECTED.labels("not_storable").inc()
        return jsonify(error="unprocessable", reason=str(exc)), 422
    # orjson rather than jsonify: the provider's machinery cost about a twelfth of a webhook's CPU.
    return Response(orjson.dumps(result.to_json()), 200, mimetype="application/json")


@bp.after_request
def _count_unanswered(response: Response) -> Response:
    """A webhook answered 5xx (the database unreachable or busy: 503, which Stripe redelivers; an
    unexpected error: 500) is counted as rejected too, so that an outage shows in
    dunning_webhooks_rejected_total rather than as webhooks simply stopping. The app's error
    handlers answer these, and blueprint after_request functions see their answers."""
    if response.status_code >= 500:
        metrics.WEBHOOKS_REJECTED.labels("unavailable" if response.status_code == 503 else "error").inc()
    return response


def _body() -> bytes:
    """The request body. With a Content-Length (Stripe always sends one, checked above against
    MAX_BODY) it is read straight from the server's input: werkzeug's limited-stream wrapper cost
    about as much CPU as the read itself (11 of 25 µs a webhook). A chunked body has no length to
    check first, so werkzeug reads it, stopping at MAX_CONTENT_LENGTH (413); a chunk gunicorn cannot
    parse is a BadWebhook (400, counted as malformed)."""
    if request.content_length is None:
        try:
            return request.get_data(cache=False)
        except ParseException as exc:  # gunicorn's, for a chunk it cannot parse (app.errors for other routes)
            raise BadWebhook(unreadable_reason(exc), "malformed") from None
    body: bytes = request.environ["wsgi.input"].read(request.content_length)
    return body
