"""The one place that builds the Stripe API client (tests point it at a fake with STRIPE_API_BASE)."""

from __future__ import annotations

import stripe
from stripe._base_address import BaseAddresses

from app.config import Settings

# The Stripe API version every call asks for, whatever the installed library's own default: the
# answers this code reads (and mirrors as their webhooks would be) keep the shapes it was written and
# tested for (since 2025-03-31 an invoice names no charge or payment intent) when a library release
# moves its default. Configure the webhook endpoint at the same version (README, Configuration).
STRIPE_API_VERSION = "2026-10-28.endive"
# Short: a retry task must not hold a worker; the task's failure policy retries a timeout.
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 20.0
# Why a task asked Stripe nothing (make run's default has no key): in its answer and its log line.
NO_KEY = "STRIPE_API_KEY is not set"
# Stripe refusing our key, not the request (401: rolled or revoked; 403: lacking a permission).
KEY_REFUSED = (stripe.AuthenticationError, stripe.PermissionError)


def make_stripe_client(settings: Settings) -> stripe.StripeClient:
    """``max_network_retries=0``: retries are the task's, by failure class, visible in Flower.
    Every request that charges passes its own idempotency key."""
    base: BaseAddresses | None = {"api": settings.stripe_api_base} if settings.stripe_api_base else None
    return stripe.StripeClient(
        settings.stripe_api_key,
        base_addresses=base,
        stripe_version=STRIPE_API_VERSION,
        max_network_retries=0,
        http_client=stripe.RequestsClient(timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)),
    )
