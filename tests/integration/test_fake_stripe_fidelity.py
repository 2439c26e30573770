"""The retry path against Stripe answers the fake could not give before: a key reused for another
request (Stripe's 400 ``idempotency_error``) and a 429 that names no Retry-After."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import stripe

from app.payments.pay import retry_payment
from app.payments.retries import claim_due
from app.payments.stripe_client import make_stripe_client
from tasks.failures import FailureKind, TaskFailure
from tests.fakes import fake_stripe as outcomes
from tests.integration.dunning_setup import failed_invoice, retries


def test_the_fake_refuses_a_key_reused_for_another_request_as_stripe_does(runtime, fake_stripe):
    """Stripe's keys are the account's: the same key for another invoice or other parameters is a 400
    idempotency_error, nothing run; the same request again replays the first answer."""
    client = make_stripe_client(runtime.settings)
    client.v1.invoices.pay("in_fake_a", {}, {"idempotency_key": "k1"})
    for invoice, params in (("in_fake_b", {}), ("in_fake_a", {"payment_method": "pm_other"})):
        with pytest.raises(stripe.IdempotencyError):
            client.v1.invoices.pay(invoice, params, {"idempotency_key": "k1"})  # type: ignore[arg-type]
    client.v1.invoices.pay("in_fake_a", {}, {"idempotency_key": "k1"})
    assert fake_stripe.charges == [("in_fake_a", "k1")]
    assert [r.replayed for r in fake_stripe.pay_requests()] == [False, False, False, True]


def test_a_retry_whose_key_stripe_refuses_for_other_parameters_is_refused_not_charged(client, accounts, engine, worker,
                                                                                       runtime, fake_stripe):
    """A key Stripe already saw with other parameters: nothing ran, so the attempt is refused (an
    operator looks at it, compute backs off) rather than counted as sent or retried forever."""
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    key = retries(engine, account)[0]["idempotency_key"]
    stripe_client = make_stripe_client(runtime.settings)
    stripe_client.v1.invoices.pay(invoice, {"payment_method": "pm_someone_else"}, {"idempotency_key": key})
    charged_before = list(fake_stripe.charges)

    result = retry_payment(engine, stripe_client, retry_id, datetime.now(UTC))

    assert result.outcome == "refused" and "IdempotencyError" in (result.detail or ""), result
    assert fake_stripe.charges == charged_before  # the refused request ran nothing
    assert [r["state"] for r in retries(engine, account)] == ["refused"]


def test_a_rate_limit_without_retry_after_leaves_the_retry_to_the_policy_backoff(client, accounts, engine, worker,
                                                                                 runtime, fake_stripe):
    account, customer = accounts.create()
    failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    fake_stripe.script(outcomes.rate_limit(retry_after=None))
    (retry_id,) = claim_due(engine, datetime.now(UTC))

    with pytest.raises(TaskFailure) as failed:
        retry_payment(engine, make_stripe_client(runtime.settings), retry_id, datetime.now(UTC))

    assert failed.value.kind == FailureKind.RATE_LIMITED and failed.value.retry_after is None
    assert fake_stripe.charges == []
    assert [r["state"] for r in retries(engine, account)] == ["dispatched"]  # charged nothing: claimable again


def test_the_payments_fake_refuses_a_key_reused_on_another_endpoint_or_amount(runtime, stripe_fake):
    """Keys are not per endpoint at Stripe: a key first used to create an intent, sent to cancel one or
    with another amount, is a 400 idempotency_error and creates nothing."""
    client = make_stripe_client(runtime.settings)
    params: dict[str, Any] = {"amount": 500, "currency": "usd", "customer": "cus_fake"}
    first = client.v1.payment_intents.create(params, {"idempotency_key": "k2"})  # type: ignore[arg-type]
    with pytest.raises(stripe.IdempotencyError):
        client.v1.payment_intents.create({**params, "amount": 600}, {"idempotency_key": "k2"})  # type: ignore[typeddict-item]
    with pytest.raises(stripe.IdempotencyError):
        client.v1.payment_intents.cancel(first.id, {}, {"idempotency_key": "k2"})
    again = client.v1.payment_intents.create(params, {"idempotency_key": "k2"})  # type: ignore[arg-type]
    assert again.id == first.id and list(stripe_fake.intents) == [first.id]
    assert stripe_fake.intents[first.id]["status"] == "succeeded"  # the refused cancel ran nothing


def test_an_unanswered_retry_is_not_sent_again_once_stripe_may_have_forgotten_its_key(client, accounts, engine,
                                                                                      worker, runtime, fake_stripe):
    """The charge ran at Stripe, its answer was lost; the row stays charging. With a guard window
    longer than a day (the policy allows a week), a delivery 25 hours later must not send the key
    again: Stripe keeps a key's answer for 24 hours only, after which the request would run afresh,
    an attempt on the invoice nobody counted. The row is counted as sent instead."""
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    fake_stripe.script(outcomes.lost_answer())
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    stripe_client = make_stripe_client(runtime.settings)
    two_days = 2 * 24 * 60
    with pytest.raises(TaskFailure):
        retry_payment(engine, stripe_client, retry_id, datetime.now(UTC), guard_minutes=two_days)
    fake_stripe.expire_keys()  # a day later at Stripe

    later = retry_payment(engine, stripe_client, retry_id, datetime.now(UTC) + timedelta(hours=25),
                          guard_minutes=two_days)

    assert later.outcome == "skipped", later
    assert len(fake_stripe.charges) == 1 and len(fake_stripe.pay_requests(invoice)) == 1
    assert [r["state"] for r in retries(engine, account)] == ["sent"]  # it may have charged: stays counted


def test_the_fake_turns_a_refused_key_away_before_it_looks_at_the_idempotency_key(runtime, fake_stripe):
    """Stripe authenticates a request before anything else: with our API key refused (rolled or
    revoked) a request is a 401 even for an idempotency key whose answer is saved, and nothing is
    replayed, run or saved; once the key works again the same idempotency key replays its answer.
    The fake's key_refused (d5b8a27) was answered only after its replay, so a retry sent again with
    its key after our key was revoked got the saved answer instead of Stripe's 401."""
    client = make_stripe_client(runtime.settings)
    client.v1.invoices.pay("in_fake_a", {}, {"idempotency_key": "k1"})
    fake_stripe.script(outcomes.key_refused())

    with pytest.raises(stripe.AuthenticationError):
        client.v1.invoices.pay("in_fake_a", {}, {"idempotency_key": "k1"})
    client.v1.invoices.pay("in_fake_a", {}, {"idempotency_key": "k1"})

    assert fake_stripe.charges == [("in_fake_a", "k1")]
    assert [r.replayed for r in fake_stripe.pay_requests()] == [False, False, True]


def test_the_payments_fake_refuses_an_intent_confirmed_with_nowhere_to_return_as_stripe_does(runtime, stripe_fake):
    """With a method enabled in the Dashboard that may redirect (Stripe's automatic payment methods,
    the default since API 2023-08-16), an intent confirmed at creation needs a return_url unless it
    turns redirects away: Stripe's 400, nothing created. Off session, turning them away is the answer."""
    client = make_stripe_client(runtime.settings)
    params: dict[str, Any] = {"amount": 500, "currency": "usd", "customer": "cus_fake", "payment_method": "pm_fake",
                              "confirm": True, "off_session": True}
    with pytest.raises(stripe.InvalidRequestError, match="return_url"):
        client.v1.payment_intents.create(params, {"idempotency_key": "k3"})  # type: ignore[arg-type]
    assert stripe_fake.intents == {}
    intent = client.v1.payment_intents.create(
        {**params, "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"}},  # type: ignore[typeddict-item]
        {"idempotency_key": "k4"})
    assert intent.status == "succeeded" and list(stripe_fake.intents) == [intent.id]


@pytest.mark.parametrize("currency", ["kwd", "bhd", "jod", "omr", "tnd"])
def test_the_payments_fake_refuses_a_three_decimal_card_amount_not_ending_in_zero_as_stripe_does(
        runtime, stripe_fake, currency):
    """Stripe charges a card in a three-decimal currency to the tenth of its minor unit only (its
    currencies guide: round such amounts to the nearest ten): 1.234 KWD is a 400
    invalid_request_error on ``amount``, nothing created; 1.230 KWD, and 1234 in a two-decimal
    currency, are charged."""
    client = make_stripe_client(runtime.settings)
    params: dict[str, Any] = {"amount": 1234, "currency": currency, "customer": "cus_fake",
                              "payment_method": "pm_fake", "confirm": True, "off_session": True,
                              "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"}}
    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.v1.payment_intents.create(params, {"idempotency_key": f"k5-{currency}"})  # type: ignore[arg-type]
    assert (refused.value.http_status, refused.value.code, refused.value.param) == (400, "invalid_charge_amount",
                                                                                    "amount")
    assert stripe_fake.intents == {}
    rounded = client.v1.payment_intents.create({**params, "amount": 1230},  # type: ignore[typeddict-item]
                                               {"idempotency_key": f"k6-{currency}"})
    two_decimal = client.v1.payment_intents.create({**params, "currency": "usd"},  # type: ignore[typeddict-item]
                                                   {"idempotency_key": f"k7-{currency}"})
    assert (rounded.status, two_decimal.status) == ("succeeded", "succeeded")
    assert list(stripe_fake.intents) == [rounded.id, two_decimal.id]
