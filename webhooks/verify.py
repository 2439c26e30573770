"""Signature verification with the stripe library (300 s tolerance)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import stripe

TOLERANCE_SECONDS = 300


class BadWebhook(ValueError):
    """The request is not a genuine, fresh Stripe event; the message says why (safe to return)."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code  # metric label: signature | tolerance | malformed | not_json | config


def verify_and_parse(body: bytes, signature: str | None, secret: str) -> tuple[dict[str, Any], str]:
    """-> (decoded event, body text). Raises BadWebhook."""
    if not secret:
        raise BadWebhook("webhook secret is not configured (STRIPE_WEBHOOK_SECRET)", "config")
    if not signature:
        raise BadWebhook("missing Stripe-Signature header", "signature")
    if not signature.isascii():
        # Stripe's header is ASCII (a timestamp and hex digests); the library compares each v1 value
        # with hmac.compare_digest, which raises TypeError on a str holding anything else.
        raise BadWebhook("malformed Stripe-Signature header", "malformed")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadWebhook("body is not UTF-8", "not_json") from exc
    try:
        # verify_header checks the HMAC of these exact bytes and, given a tolerance, the timestamp.
        stripe.WebhookSignature.verify_header(text, signature, secret, tolerance=TOLERANCE_SECONDS)
    except stripe.SignatureVerificationError as exc:
        message = str(exc.user_message or exc).lower()
        if "tolerance" in message:
            raise BadWebhook("signature timestamp outside the 300 s tolerance", "tolerance") from exc
        if "matching the expected signature" in message:
            raise BadWebhook("signature does not match the body", "signature") from exc
        if "unable to extract" in message or "no signatures" in message:
            raise BadWebhook("malformed Stripe-Signature header", "malformed") from exc
        raise BadWebhook("signature does not match the body", "signature") from exc
    event = _decode(text)
    if not isinstance(event, dict):
        raise BadWebhook("body is not a Stripe event", "not_event")
    return event, text


def _decode(text: str) -> Any:
    """JSON -> Python. orjson parses a Stripe event in about a third of json.loads' time; what it
    refuses and json.loads accepts (a lone surrogate escape, NaN) goes to json.loads. One difference
    remains: orjson reads an integer beyond 64 bits as a float. No such number fits a column (they
    are refused with 422 either way) and the raw body is stored as it came."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadWebhook("body is not JSON", "not_json") from exc
    except RecursionError:
        # orjson stops at 1024 levels; json.loads runs out of stack a little earlier. No Stripe event
        # nests anywhere near that deep.
        raise BadWebhook("body is not JSON that can be read: nested too deeply", "not_json") from None
