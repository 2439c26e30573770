"""A fake Stripe API: ``POST /v1/invoices/<id>/pay`` with programmable outcomes.

Like Stripe, it remembers the first answer for an idempotency key and replays it for a repeated
key (a rate-limited request is rejected before it runs, even for a saved key, so a 429 is not
remembered and does not replay), and it counts a *charge* only for a request that actually ran.
Shapes: the invoice is the real fixture with its id and status overridden; errors use Stripe's
error envelope.

``hold()`` freezes a caller at a known point: the request is recorded at once (so a test can wait
until a worker is inside the Stripe call), and answered, as a success that ran, only when the test
calls ``release()`` — by then the caller may be dead, like a client killed while Stripe charged.
``lost_answer()`` charges (and saves the answer for the key) but closes the connection without
answering, like a read timeout after Stripe ran the request.

``paid_elsewhere()`` pays an invoice at "Stripe" (the customer on the hosted page, say): paying it
is then refused as Stripe refuses it (400 ``invoice_not_open``), and ``GET /v1/invoices/<id>``
answers it paid. Any other invoice is unknown to that GET (404), as to a Stripe account that never
had it.

A key is Stripe's for the whole account, not per endpoint: sent again for another invoice or with
other parameters than its first request, it is refused with a 400 ``idempotency_error`` (nothing
runs, nothing is replayed), as Stripe refuses a key reused for a request that does not match.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from tests.fakes.server import Answer, FakeServer
from tests.stripe_events import resource


@dataclass
class PayRequest:
    invoice_id: str
    idempotency_key: str | None
    params: dict[str, list[str]]
    replayed: bool


@dataclass
class Outcome:
    # success | decline | requires_action | rate_limit | server_error | invalid | in_progress | slow | hold
    # | lost_answer
    kind: str
    decline_code: str = "insufficient_funds"
    retry_after: int | None = 1  # None: the 429 names no Retry-After (Stripe does not promise one)
    delay: float = 0.0


def success() -> Outcome:
    return Outcome("success")


def decline(code: str = "insufficient_funds") -> Outcome:
    return Outcome("decline", decline_code=code)


def requires_action() -> Outcome:
    """The issuer wants the cardholder to authenticate (3-D Secure): Stripe attempted the payment, the
    invoice's PaymentIntent now waits in ``requires_action``, and the answer is a 400
    ``invalid_request_error`` with code ``invoice_payment_intent_requires_action``, not a card error."""
    return Outcome("requires_action")


def rate_limit(retry_after: int | None = 1) -> Outcome:
    return Outcome("rate_limit", retry_after=retry_after)


def server_error() -> Outcome:
    return Outcome("server_error")


def invalid() -> Outcome:
    return Outcome("invalid")


def key_refused() -> Outcome:
    """Stripe's 401 for an API key rolled or revoked: turned away before anything runs (nothing
    charged, nothing saved for the key), as fake_stripe_payments' ``key_revoked``."""
    return Outcome("key_refused")


def in_progress() -> Outcome:
    """Stripe's 409 while another request with the same idempotency key is still running."""
    return Outcome("in_progress")


def slow(delay: float) -> Outcome:
    return Outcome("slow", delay=delay)


def hold() -> Outcome:
    """Recorded on arrival, answered with a success only after ``FakeStripe.release()``."""
    return Outcome("hold")


def lost_answer() -> Outcome:
    """The charge runs (a success, saved for the key) but the caller gets no answer: the connection
    closes, as when its read times out while Stripe charges."""
    return Outcome("lost_answer")


@dataclass
class FakeStripe:
    requests: list[PayRequest] = field(default_factory=list)
    charges: list[tuple[str, str | None]] = field(default_factory=list)  # (invoice, idempotency key) that ran
    default: Outcome = field(default_factory=success)
    _script: deque[Outcome] = field(default_factory=deque)
    _saved: dict[str, Answer] = field(default_factory=dict)
    _saved_for: dict[str, tuple[str, dict[str, list[str]]]] = field(default_factory=dict)  # key: its request
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _release: threading.Event = field(default_factory=threading.Event)
    _held: threading.Event = field(default_factory=threading.Event)  # set: held requests go on
    invoices: dict[str, dict[str, Any]] = field(default_factory=dict)  # paid elsewhere, by id
    api_versions: list[str | None] = field(default_factory=list)  # the Stripe-Version of each request
    # Called with the invoice id on each GET /v1/invoices/<id>, before it is answered: a test moves its
    # frozen clock there, as the time a real read takes passes between a retry's claim and its charge.
    on_invoice_read: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        self.server = FakeServer(self._handle)

    @property
    def url(self) -> str:
        return self.server.url

    def script(self, *outcomes: Outcome) -> None:
        """The next requests get these outcomes in order, then ``default``."""
        with self._lock:
            self._script.extend(outcomes)

    def release(self) -> None:
        """Let every held request (and any later one scripted to hold) run and answer."""
        self._held.set()

    def paid_elsewhere(self, invoice_id: str, customer: str, amount: int) -> None:
        """The invoice is paid at Stripe by something other than this product."""
        invoice = resource("invoice")
        invoice.update(id=invoice_id, customer=customer, status="paid", amount_due=amount, amount_paid=amount,
                       amount_remaining=0)
        with self._lock:
            self.invoices[invoice_id] = invoice

    def expire_keys(self) -> None:
        """Forget every saved answer, as Stripe prunes a key once it is more than 24 hours old: the same
        key then runs its request afresh."""
        with self._lock:
            self._saved.clear()
            self._saved_for.clear()

    def pay_requests(self, invoice_id: str | None = None) -> list[PayRequest]:
        with self._lock:
            return [r for r in self.requests if invoice_id is None or r.invoice_id == invoice_id]

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer | None:
        with self._lock:
            self.api_versions.append(headers.get("stripe-version"))
        parts = path.split("?")[0].strip("/").split("/")
        if method == "GET" and len(parts) == 3 and parts[:2] == ["v1", "invoices"]:
            if self.on_invoice_read is not None:
                self.on_invoice_read(parts[2])
            with self._lock:
                found = self.invoices.get(parts[2])
            if found is None:
                return 404, {}, _error("invalid_request_error", "resource_missing", f"No such invoice: '{parts[2]}'")
            return 200, {"Request-Id": "req_fake"}, found
        if method != "POST" or len(parts) != 4 or parts[:2] != ["v1", "invoices"] or parts[3] != "pay":
            return 404, {}, _error("invalid_request_error", "resource_missing", f"Unrecognized request URL ({path})")
        invoice_id = parts[2]
        key = headers.get("idempotency-key")
        params = parse_qs(body.decode())
        with self._lock:
            # Stripe authenticates a request before anything else: a refused API key is a 401 even
            # for an idempotency key whose answer is saved, or an invoice already paid; nothing is
            # run, replayed or saved.
            if (self._script[0] if self._script else self.default).kind == "key_refused":
                refused = self._script.popleft() if self._script else self.default
                self.requests.append(PayRequest(invoice_id, key, params, replayed=False))
                return self._answer(refused, invoice_id, params)
            # Stripe's rate limiter turns a request away before it looks at the key: a scripted 429
            # is answered even for a key whose answer is saved.
            limited = self._script[0].kind == "rate_limit" if self._script else False
            if key is not None and key in self._saved and not limited:
                if self._saved_for.get(key) != (invoice_id, params):
                    self.requests.append(PayRequest(invoice_id, key, params, replayed=False))
                    return 400, {"Request-Id": "req_fake"}, _error(
                        "idempotency_error", None, "Keys for idempotent requests can only be used with the same "
                        f"parameters they were first used with. Try using a key other than '{key}'.")
                self.requests.append(PayRequest(invoice_id, key, params, replayed=True))
                status, h, payload = self._saved[key]
                return status, {**h, "Idempotent-Replayed": "true"}, payload
            self.requests.append(PayRequest(invoice_id, key, params, replayed=False))
            if invoice_id in self.invoices:  # Stripe refuses to pay a paid invoice, charging nothing
                return 400, {}, _error("invalid_request_error", "invoice_not_open", "Invoice is already paid.")
            outcome = self._script.popleft() if self._script else self.default
        if outcome.kind == "slow":
            self._release.wait(outcome.delay)
            outcome = success()
        elif outcome.kind == "hold":
            self._held.wait()
            outcome = success()
        answer = self._answer(success() if outcome.kind == "lost_answer" else outcome, invoice_id, params)
        with self._lock:
            # Like Stripe, a request that never started running (rate limited, or refused because
            # another with the same key is running) is neither a charge nor saved for the key.
            if outcome.kind not in ("rate_limit", "in_progress"):
                self.charges.append((invoice_id, key))
                if key is not None:
                    self._saved[key] = answer
                    self._saved_for[key] = (invoice_id, params)
        return None if outcome.kind == "lost_answer" else answer

    def _answer(self, outcome: Outcome, invoice_id: str, params: dict[str, list[str]]) -> Answer:
        if outcome.kind == "success":
            invoice = resource("invoice")
            invoice.update(id=invoice_id, status="paid", amount_remaining=0)
            return 200, {"Request-Id": "req_fake"}, invoice
        if outcome.kind == "decline":
            err = _error("card_error", "card_declined", "Your card has insufficient funds.")
            err["error"]["decline_code"] = outcome.decline_code
            return 402, {"Request-Id": "req_fake"}, err
        if outcome.kind == "requires_action":
            return 400, {"Request-Id": "req_fake"}, _error(
                "invalid_request_error", "invoice_payment_intent_requires_action",
                "This payment requires additional user action before it can be completed successfully. "
                "Payment can be completed using the PaymentIntent associated with the invoice.")
        if outcome.kind == "rate_limit":
            limit_headers = {} if outcome.retry_after is None else {"Retry-After": str(outcome.retry_after)}
            return 429, limit_headers, _error(
                "invalid_request_error", "rate_limit", "Too many requests hit the API too quickly.")
        if outcome.kind == "server_error":
            return 500, {}, _error("api_error", None, "An unknown error occurred.")
        if outcome.kind == "in_progress":
            return 409, {}, _error("idempotency_error", None, "There is currently another in-progress request "
                                   "using this Stripe-Idempotency-Key. Please try again later.")
        if outcome.kind == "invalid":
            return 400, {}, _error("invalid_request_error", "invoice_not_open", "Invoice is already paid.")
        if outcome.kind == "key_refused":
            return 401, {"Request-Id": "req_fake"}, _error(
                "invalid_request_error", None, "Expired API Key provided: sk_test_********cdef")
        raise ValueError(outcome.kind)

    def __enter__(self) -> FakeStripe:
        self.server.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._release.set()
        self._held.set()
        self.server.stop()


def _error(kind: str, code: str | None, message: str) -> dict[str, Any]:
    err: dict[str, Any] = {"type": kind, "message": message}
    if code is not None:
        err["code"] = code
    return {"error": err}
