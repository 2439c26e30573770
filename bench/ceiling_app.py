"""The product's web app with one more route, for bench/ingest.py only.

``POST /bench/verify-only`` does what ``POST /webhooks/stripe`` does before it touches the database:
read the body, verify the signature with the stripe library, parse and extract the event, answer
JSON. Its rate is the ceiling of any ingest design on this stack (gunicorn, Flask, the stripe
library, Python), whatever the storage and the queue cost.
"""

from __future__ import annotations

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

from app import create_app as product_app
from app.web import runtime
from webhooks.mirror import NotAStripeEvent, extract
from webhooks.verify import BadWebhook, verify_and_parse


def create_app() -> Flask:
    app = product_app()

    @app.post("/bench/verify-only")
    def verify_only() -> ResponseReturnValue:
        try:
            event, _text = verify_and_parse(request.get_data(cache=False), request.headers.get("Stripe-Signature"),
                                            runtime().settings.stripe_webhook_secret)
            ex = extract(event)
        except (BadWebhook, NotAStripeEvent) as exc:
            return jsonify(error="bad_request", reason=str(exc)), 400
        return jsonify(received=True, id=ex.event_id, type=ex.type), 200

    return app
