"""POST /pay-bad-debt when Stripe surely did not run the payment (rate limited, no connection made):
nothing is stored under the caller's Idempotency-Key, nothing stays in flight, and the same key
pays for real later. An outcome Stripe may have run stays in flight as before."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from tests.conftest import point_stripe_at, wait_for
from tests.fakes.fake_stripe_payments import FakeStripePayments
from tests.fakes.server import FakeServer
from tests.integration.bad_debt_setup import InBadDebt, dunning_row, key, pay, payments, recompute


def body(debtor: InBadDebt) -> dict[str, Any]:
    return {"account_id": debtor.account, "amount": debtor.amount}


def rules(summary: dict[str, Any]) -> set[str]:
    return {r["rule"] for r in summary["reasons"]}


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """An address where no connection can be made: a port bound but not listening refuses it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def create_goes_to(stripe_fake: FakeStripePayments, runtime: Any, monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """The invoice lookups reach the fake; the payment intent's creation, asked right after the
    last of them, goes to ``url``."""
    def after_lookups(method: str, path: str) -> None:
        if path.startswith("/v1/invoice_payments"):
            point_stripe_at(runtime, monkeypatch, url)
    stripe_fake.on_request = after_lookups


def test_a_rate_limited_payment_stores_nothing_and_the_same_key_then_pays(client, engine, runtime, debtor,
                                                                          stripe_fake):
    stripe_fake.intent_outcome = "rate_limited"
    idem = key()
    refused = pay(client, body(debtor), idem)
    assert refused.status_code == 503, refused.json
    assert refused.json["error"] == "payment_provider_unavailable" and "rate limited" in refused.json["reason"]
    assert refused.headers["Retry-After"] == "1"  # the fake's, as Stripe's own
    assert stripe_fake.intents == {}
    # No payment in flight: the account is back in bad debt, with no failed payment to its name.
    assert payments(engine, debtor.account) == []
    summary = recompute(engine, runtime, debtor.account, "BAD_DEBT_PAID")
    assert summary["status"] == "bad_debt" and "bad_debt.payment_failed" not in rules(summary)

    stripe_fake.intent_outcome = "succeeded"
    paid = pay(client, body(debtor), idem)
    assert paid.status_code == 202, paid.json
    assert paid.json["state"] == "pending" and paid.json["stripe_payment_intent_id"] in stripe_fake.intents
    first, second = stripe_fake.intents_created()
    # Stripe kept nothing under its key for the 429 (its rate limiters run before its idempotency
    # layer): the same derived key runs for real.
    assert first.idempotency_key == second.idempotency_key and not second.replayed
    [row] = payments(engine, debtor.account)
    assert row["state"] == "pending" and row["response_status"] == 202
    assert pay(client, body(debtor), idem).json == paid.json  # from now on the key replays the payment


@pytest.mark.parametrize("stripe_asks, answered", [
    (7, "7"), (None, "2"), (86400, "60"), ("0.2", "1"), ("0", "1"), ("-5", "1"),
    # Not a number of seconds (an HTTP date, garbage, not finite): as if Stripe had named none.
    ("Wed, 21 Oct 2026 07:28:00 GMT", "2"), ("soon", "2"), ("nan", "2"), ("inf", "2"), ("1e400", "2")])
def test_the_retry_after_is_stripes_own_else_a_small_default(client, engine, debtor, stripe_fake, stripe_asks,
                                                              answered):
    stripe_fake.intent_outcome, stripe_fake.rate_limit_retry_after = "rate_limited", stripe_asks
    refused = pay(client, body(debtor), key())
    assert (refused.status_code, refused.headers["Retry-After"]) == (503, answered)


@pytest.mark.worker
def test_a_recompute_that_ran_while_stripe_was_asked_does_not_leave_the_account_lifting(client, engine, runtime,
                                                                                       debtor, stripe_fake, worker):
    stripe_fake.intent_outcome = "rate_limited"
    seen: list[str] = []
    stripe_fake.before_answer = lambda: seen.append(recompute(engine, runtime, debtor.account, "MANUAL")["status"])
    assert pay(client, body(debtor), key()).status_code == 503 and seen == ["lifting"]
    state = wait_for(lambda: (d := dunning_row(engine, debtor.account))["status"] == "bad_debt" and d,
                     message="back in bad debt")
    assert "bad_debt.payment_failed" not in {r["rule"] for r in state["reasons"]}
    stripe_fake.before_answer, stripe_fake.intent_outcome = None, "succeeded"
    assert pay(client, body(debtor), key()).status_code == 202  # nothing in flight blocks the next payment


def test_a_payment_stripe_could_not_be_connected_to_stores_nothing(client, engine, runtime, debtor, stripe_fake,
                                                                   refusing_url, monkeypatch):
    create_goes_to(stripe_fake, runtime, monkeypatch, refusing_url)
    idem = key()
    refused = pay(client, body(debtor), idem)
    assert refused.status_code == 503, refused.json
    assert "no connection could be made" in refused.json["reason"] and refused.headers["Retry-After"] == "2"
    assert payments(engine, debtor.account) == []
    assert recompute(engine, runtime, debtor.account, "BAD_DEBT_PAID")["status"] == "bad_debt"

    stripe_fake.on_request = None
    point_stripe_at(runtime, monkeypatch, stripe_fake.url)
    assert pay(client, body(debtor), idem).status_code == 202
    assert len(stripe_fake.intents) == 1


def test_a_connection_lost_after_the_request_was_sent_stays_in_flight(client, engine, runtime, debtor, stripe_fake,
                                                                      monkeypatch):
    """Connected, sent, no answer: Stripe may have charged. Unknown, as before: nothing is released."""
    silent = FakeServer(lambda *request: None).start()  # reads the request, closes without answering
    try:
        create_goes_to(stripe_fake, runtime, monkeypatch, silent.url)
        idem = key()
        response = pay(client, body(debtor), idem)
    finally:
        silent.stop()
    assert response.status_code == 502, response.json
    assert (response.json["error"], response.json["state"]) == ("payment_outcome_unknown", "pending")
    [row] = payments(engine, debtor.account)
    assert row["state"] == "pending"
    assert recompute(engine, runtime, debtor.account, "BAD_DEBT_PAID")["status"] == "lifting"
    assert pay(client, body(debtor), idem).json == response.json
    again = pay(client, body(debtor), key())
    assert (again.status_code, again.json["error"]) == (409, "payment_in_flight")


def test_a_rate_limited_invoice_lookup_is_a_503_with_retry_after(client, engine, debtor, stripe_fake):
    stripe_fake.invoice_payments_rate_limited, stripe_fake.rate_limit_retry_after = True, 3
    idem = key()
    refused = pay(client, body(debtor), idem)
    assert (refused.status_code, refused.json["error"]) == (503, "payment_provider_unavailable")
    assert refused.headers["Retry-After"] == "3" and "invoices" in refused.json["reason"]
    assert payments(engine, debtor.account) == [] and stripe_fake.intents_created() == []

    stripe_fake.invoice_payments_rate_limited = False
    assert pay(client, body(debtor), idem).status_code == 202


# --- Stripe refusing our API key: ours to fix, seen by an operator ------------------------------


def key_refused(status: int) -> Any:
    """A Stripe that refuses the key: 401 (revoked, rolled) or 403 (a restricted key without the
    permission for the endpoint), with Stripe's error envelope, as every request with that key gets."""
    message = {401: "Invalid API Key provided: rk_live_****1234",
               403: "The provided key 'rk_live_****1234' does not have the required permissions for this endpoint"}
    return FakeServer(lambda *request: (status, {"Request-Id": "req_refused"},
                                        {"error": {"type": "invalid_request_error", "message": message[status]}}))


def key_refused_counted() -> float:
    return REGISTRY.get_sample_value("dunning_bad_debt_payments_not_run_total", {"why": "key_refused"}) or 0.0


def test_a_payment_stripe_refuses_our_key_for_is_an_error_an_operator_sees(client, engine, runtime, debtor,
                                                                           stripe_fake, monkeypatch, caplog):
    """The lookups pass, the intent's creation is refused (a restricted key without the permission to
    create payment intents): every customer's payment is refused so until someone replaces the key.
    Nothing stored, as for a rate limit; but not a 'try again in 2 s' for every customer, and not a
    warning nobody reads."""
    counted = key_refused_counted()
    refusing = key_refused(403).start()
    try:
        create_goes_to(stripe_fake, runtime, monkeypatch, refusing.url)
        idem = key()
        with caplog.at_level(logging.ERROR, logger="app.payments.bad_debt"):
            refused = pay(client, body(debtor), idem)
    finally:
        refusing.stop()
    assert (refused.status_code, refused.json["error"]) == (503, "payment_provider_unavailable"), refused.json
    assert refused.headers["Retry-After"] == "60"  # a key is not replaced in 2 s
    assert payments(engine, debtor.account) == []
    assert key_refused_counted() == counted + 1
    assert any(r.levelno == logging.ERROR and "API key" in r.getMessage() for r in caplog.records), caplog.text

    # The key replaced: the same Idempotency-Key pays.
    stripe_fake.on_request = None
    point_stripe_at(runtime, monkeypatch, stripe_fake.url)
    assert pay(client, body(debtor), idem).status_code == 202


def test_an_invoice_lookup_stripe_refuses_our_key_for_is_an_error_an_operator_sees(client, engine, runtime, debtor,
                                                                                   stripe_fake, monkeypatch, caplog):
    counted = key_refused_counted()
    refusing = key_refused(401).start()
    try:
        point_stripe_at(runtime, monkeypatch, refusing.url)
        with caplog.at_level(logging.ERROR, logger="app.payments.bad_debt"):
            refused = pay(client, body(debtor), key())
    finally:
        refusing.stop()
    assert (refused.status_code, refused.json["error"]) == (503, "payment_provider_unavailable"), refused.json
    assert refused.headers["Retry-After"] == "60" and "invoices" in refused.json["reason"]
    assert payments(engine, debtor.account) == [] and stripe_fake.intents_created() == []
    assert key_refused_counted() == counted + 1
    assert any(r.levelno == logging.ERROR and "API key" in r.getMessage() for r in caplog.records), caplog.text


# --- a key whose payment is removed while another request with it runs ------------------------


def test_a_key_whose_payment_stripe_did_not_run_is_removed_under_a_conflicting_request_is_no_500(
        flask_app, engine, runtime, accounts, debtor, stripe_fake, monkeypatch):
    """The Idempotency-Key is unique across accounts. Request B (another account's body, the same key)
    looks the key up before request A stores its payment, and inserts its own after: the key's index
    refuses B. Before B looks the key up again, Stripe rate-limits A's payment and A's row is removed:
    B found no row, and re-raised the index's error, a 500. B is told to send it again (nothing is
    kept for the key), and then it runs."""
    import threading

    from app.payments import bad_debt
    from tests.integration.bad_debt_setup import into_bad_debt

    other = into_bad_debt(flask_app.test_client(), engine, runtime, accounts)
    stripe_fake.add_invoice(other.invoice_object)
    stripe_fake.intent_outcome = "rate_limited"
    idem = key()
    a_at_stripe, b_refused = threading.Event(), threading.Event()
    answers: dict[str, Any] = {}

    def run(name: str, debt: InBadDebt) -> None:
        try:
            answers[name] = pay(flask_app.test_client(), body(debt), idem)
        except BaseException as exc:  # the app's error, propagated by the test client
            answers[name] = exc

    first = threading.Thread(target=run, args=("A", debtor), name="A")
    real_at_stripe, real_replay = bad_debt._at_stripe, bad_debt._replay

    def a_stores_its_payment_meanwhile(rt: Any, debt: Any) -> Any:
        quoted = real_at_stripe(rt, debt)
        if threading.current_thread().name == "B":  # B looked the key up: none yet
            first.start()
            assert a_at_stripe.wait(10)  # A's row is committed, Stripe is being asked
        return quoted

    def a_ends_before_b_looks_again(conn: Any, req: Any) -> Any:
        if threading.current_thread().name == "B" and a_at_stripe.is_set():  # the key's index refused B
            b_refused.set()
            first.join(10)
        return real_replay(conn, req)

    def a_waits_for_b_to_be_refused() -> None:
        a_at_stripe.set()
        assert b_refused.wait(10)

    monkeypatch.setattr(bad_debt, "_at_stripe", a_stores_its_payment_meanwhile)
    monkeypatch.setattr(bad_debt, "_replay", a_ends_before_b_looks_again)
    stripe_fake.before_answer = a_waits_for_b_to_be_refused
    second = threading.Thread(target=run, args=("B", other), name="B")
    second.start()
    second.join(30)
    assert not first.is_alive() and not second.is_alive()
    assert (answers["A"].status_code, answers["A"].json["error"]) == (503, "payment_provider_unavailable")
    refused = answers["B"]
    assert not isinstance(refused, BaseException), refused
    assert (refused.status_code, refused.json["error"]) == (409, "request_in_progress"), refused.json
    assert payments(engine, debtor.account) == [] and payments(engine, other.account) == []

    stripe_fake.before_answer, stripe_fake.intent_outcome = None, "succeeded"
    again = pay(flask_app.test_client(), body(other), idem)
    assert again.status_code == 202, again.json
    assert [p["state"] for p in payments(engine, other.account)] == ["pending"]


def test_without_a_stripe_key_a_payment_is_a_503_naming_the_key_and_nothing_asks_stripe(
        client, engine, runtime, debtor, stripe_fake, monkeypatch, caplog):
    """make run's default has no STRIPE_API_KEY: the payment was asked of Stripe with an empty key
    (at api.stripe.com: a 401 read as 'Stripe refuses our key', or no connection at all). It is a
    503 that names the missing setting, and nothing is asked or stored."""
    with_key = runtime.settings
    monkeypatch.setattr(runtime, "settings", with_key.with_overrides(stripe_api_key=""))
    idem = key()
    with caplog.at_level(logging.ERROR, logger="app.payments.bad_debt"):
        refused = pay(client, body(debtor), idem)
    assert (refused.status_code, refused.json["error"]) == (503, "payment_provider_unavailable"), refused.json
    assert "STRIPE_API_KEY is not set" in refused.json["reason"]
    assert refused.headers["Retry-After"] == "60"
    assert stripe_fake.calls == [] and payments(engine, debtor.account) == []
    assert any(r.levelno == logging.ERROR and "STRIPE_API_KEY" in r.getMessage() for r in caplog.records), caplog.text

    monkeypatch.setattr(runtime, "settings", with_key)  # the key set: the same Idempotency-Key pays
    assert pay(client, body(debtor), idem).status_code == 202
