"""A fake Stripe API for the bad-debt payment path, as a real HTTP server on 127.0.0.1.

* ``POST /v1/payment_intents``: answers by ``intent_outcome``: "succeeded" / "processing" (a
  PaymentIntent object, the real fixture with ids and values overridden), "decline" (402 with
  Stripe's error envelope, type card_error), "server_error" (500, type api_error, nothing charged),
  "server_error_after_charge" (the intent is created and succeeds, the answer is still that 500:
  Stripe says a 5xx's outcome is unknown), "rate_limited" (429, Stripe's error envelope for a rate
  limit, nothing created). ``before_answer``, when set, runs before it answers (what else happens
  while the caller waits on Stripe).
* ``POST /v1/invoices/<id>/pay`` (``paid_out_of_band``) and ``GET /v1/invoices/<id>`` on the invoices
  the test registered; paying a paid invoice is a 400 invalid_request_error, like Stripe.
  ``before_paying``, when set, runs before an invoice is paid (what else happens meanwhile).
  ``pay_outcome`` "server_error" answers 500 and "rate_limited" 429, paying nothing;
  "server_error_after_pay" pays the invoice and answers 500 all the same.
* ``GET /v1/invoice_payments?invoice=`` lists an invoice's payments by the customer, which
  ``pay_elsewhere`` makes (the real fixture, ids and values overridden); paying out of band makes none.
  ``fail_invoice`` makes a failed payment intent and its open invoice payment (an automatic attempt
  the issuer declined). ``invoice_payments_down`` answers the listing with a 500,
  ``invoice_payments_rate_limited`` with a 429, and for an invoice in ``unknown_invoices`` it is a 404
  ``resource_missing``, as for an invoice Stripe does not have.
* ``GET /v1/invoices/<id>/lines`` lists the lines ``set_lines`` gave an invoice (the real line_item
  fixture, ids and values overridden), paginated as Stripe does: ``limit`` (10 by default, at most
  100), ``starting_after`` a line's id, ``has_more``. ``invoice_lines_down`` answers it with a 500,
  ``invoice_lines_rate_limited`` with a 429, and for an invoice in ``invoice_lines_down_for`` it is a 500;
  an invoice it has no lines for is a 404 ``resource_missing``.
* ``credit_note`` issues a credit note on an invoice, as the business would in the Dashboard: its
  pre-payment part lowers amount_due and amount_remaining (not below zero) and adds to
  pre_payment_credit_notes_amount, the rest adds to post_payment_credit_notes_amount; no invoice
  payment. An invoice still owed that is credited down to nothing is paid. One on a draft or void
  invoice, or beyond the invoice's total, is refused (a ValueError: a test asked what Stripe does not do).
* ``GET /v1/payment_intents/<id>``, ``GET /v1/payment_intents?customer=&created[gte]=`` (Stripe's list
  envelope, newest first) and ``POST /v1/payment_intents/<id>/cancel`` (400 once the intent has
  succeeded or is cancelled) on every intent it created, those behind a 500 included.
  ``set_status`` moves an intent on, as Stripe would.

A payment intent confirmed at creation (``confirm=true``) without a ``return_url`` is refused with
Stripe's 400 unless it turns redirect-based payment methods away
(``automatic_payment_methods[allow_redirects]=never``) or names its ``payment_method_types``: since
API 2023-08-16 an intent accepts the methods enabled in the Dashboard, and any of them that may
redirect the customer needs somewhere to send them back (``redirect_methods_enabled``, on by default,
as on an account with such a method enabled; nothing is created).

A card payment intent in a three-decimal currency (bhd, jod, kwd, omr, tnd) whose amount in minor
units does not end in 0 is refused with Stripe's 400 invalid_request_error (param ``amount``): card
networks charge those currencies to the hundredth, and Stripe's currencies guide asks such amounts
rounded to the nearest ten. Every method this fake charges is a card; nothing is created.

``key_revoked`` answers every request with Stripe's 401 for a rolled or revoked API key, running nothing.

Every 429 carries ``Retry-After: <rate_limit_retry_after>`` (None: no such header). ``on_request``,
when set, is called with the method and path of each request before it is answered.

Like Stripe it replays the first answer for a repeated Idempotency-Key (not a 429's: a rate-limited
request never ran), and it records every request. A key is the account's, not an endpoint's: sent
with another method, path or parameters than its first request, it is refused with a 400
``idempotency_error``, nothing run.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from tests.fakes.server import Answer as ServerAnswer
from tests.fakes.server import FakeServer
from tests.stripe_events import resource, unique

Answer = tuple[int, dict[str, Any]]
# Stripe's rate limiters answer before its idempotency layer: this body, nothing run, nothing kept.
RATE_LIMITED: Answer = (429, {"error": {"type": "invalid_request_error", "code": "rate_limit",
                                        "message": "Too many requests hit the API too quickly."}})
# Stripe's refusal of an intent confirmed with no return_url while the Dashboard enables a method that
# may redirect (nothing created).
RETURN_URL_REQUIRED = (
    "This PaymentIntent is configured to accept payment methods enabled in your Dashboard. Because some of "
    "these payment methods might redirect your customer off of your page, you must provide a `return_url`. "
    "If you don't want to accept redirect-based payment methods, set `automatic_payment_methods[enabled]` to "
    "`true` and `automatic_payment_methods[allow_redirects]` to `never` when creating Setup Intents and "
    "Payment Intents.")

# Stripe's three-decimal currencies: a card charge in one must be a multiple of 10 minor units.
THREE_DECIMAL = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})


@dataclass
class Call:
    method: str
    path: str
    idempotency_key: str | None
    params: dict[str, str]
    replayed: bool


class FakeStripePayments:
    def __init__(self) -> None:
        self.intent_outcome = "succeeded"
        self.redirect_methods_enabled = True  # the Dashboard has a method on that may redirect (see above)
        self.decline_code = "insufficient_funds"
        self.before_answer: Callable[[], None] | None = None
        self.before_paying: Callable[[], None] | None = None
        self.on_request: Callable[[str, str], None] | None = None
        self.rate_limit_retry_after: int | None = 1
        self.charged_behind_errors: list[dict[str, Any]] = []  # intents created under a 500
        self.intents: dict[str, dict[str, Any]] = {}  # every intent created, by id
        self.pay_outcome = "paid"
        self.payments_by_invoice: dict[str, list[dict[str, Any]]] = {}
        self.invoice_payments_down = False  # listing them answers 500
        self.invoice_payments_rate_limited = False  # listing them answers 429
        self.unknown_invoices: set[str] = set()  # listing theirs answers 404
        self.lines_by_invoice: dict[str, list[dict[str, Any]]] = {}
        self.invoice_lines_down = False  # listing an invoice's lines answers 500
        self.invoice_lines_rate_limited = False  # listing an invoice's lines answers 429
        self.invoice_lines_down_for: set[str] = set()  # listing these invoices' lines answers 500
        # The API key was rolled or revoked in the Dashboard: every request is refused with Stripe's
        # 401 before it runs (nothing created, nothing kept for its idempotency key), as Stripe
        # authenticates before anything else. Each is recorded in ``refused`` (method, path), not ``calls``.
        self.key_revoked = False
        self.refused: list[tuple[str, str]] = []
        self.invoices: dict[str, dict[str, Any]] = {}
        self.calls: list[Call] = []
        self._answers: dict[str, Answer] = {}
        self._answered_for: dict[str, tuple[str, str, dict[str, str]]] = {}  # key: its first request
        self._lock = threading.Lock()
        self._server = FakeServer(self._serve)

    @property
    def url(self) -> str:
        return self._server.url

    def __enter__(self) -> FakeStripePayments:
        self._server.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.stop()

    def _serve(self, method: str, path: str, headers: dict[str, str], body: bytes) -> ServerAnswer:
        """The HTTP side: Stripe's form-encoded parameters in, its JSON and a Request-Id out."""
        query = path.partition("?")[2] if method == "GET" else body.decode()
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        key = headers.get("idempotency-key")
        if self.on_request is not None:
            self.on_request(method, path)
        if self.key_revoked:
            with self._lock:
                self.refused.append((method, path))
            return 401, {"Request-Id": unique("req")}, {"error": {
                "type": "invalid_request_error", "message": "Expired API Key provided: sk_test_********cdef"}}
        status, payload = self.handle(method, path, key, params)
        answer_headers = {"Request-Id": unique("req")}
        if status == 429 and self.rate_limit_retry_after is not None:
            answer_headers["Retry-After"] = str(self.rate_limit_retry_after)
        return status, answer_headers, payload

    # --- what tests look at -----------------------------------------------------------------

    def add_invoice(self, invoice: dict[str, Any]) -> None:
        """Stripe's copy of an invoice (the data.object of a webhook the test sent)."""
        self.invoices[invoice["id"]] = json.loads(json.dumps(invoice))

    def set_status(self, intent_id: str, status: str, decline_code: str | None = None) -> None:
        intent = self.intents[intent_id]
        intent["status"] = status
        if decline_code:
            intent["last_payment_error"] = {"type": "card_error", "code": "card_declined",
                                            "decline_code": decline_code, "message": "Your card was declined."}

    def pay_elsewhere(self, invoice_id: str, amount: int | None = None) -> None:
        """The customer pays the invoice (in full unless ``amount``) on Stripe's hosted page."""
        inv = self.invoices[invoice_id]
        paid = inv["amount_remaining"] if amount is None else amount
        now = int(time.time())
        payment = resource("invoice_payment")
        payment.update(id=unique("inpay"), invoice=invoice_id, amount_paid=paid, amount_requested=paid,
                       currency=inv["currency"], status="paid", is_default=False, created=now,
                       payment={"type": "payment_intent", "payment_intent": unique("pi")},
                       status_transitions={"canceled_at": None, "paid_at": now})
        self.payments_by_invoice.setdefault(invoice_id, []).append(payment)
        inv.update(amount_paid=inv["amount_paid"] + paid, amount_remaining=inv["amount_remaining"] - paid)
        if inv["amount_remaining"] <= 0:
            inv.update(status="paid", status_transitions={**(inv.get("status_transitions") or {}), "paid_at": now})

    def credit_note(self, invoice_id: str, amount: int) -> None:
        """A credit note of ``amount`` on the invoice (Stripe's invoice fields only: the fake keeps no
        credit note objects). Its pre-payment part is what the invoice still owes, whatever its status
        (an uncollectible invoice too); Stripe refuses one on a draft or void invoice, and credit
        notes beyond the invoice's total."""
        inv = self.invoices[invoice_id]
        if inv["status"] not in ("open", "uncollectible", "paid"):
            raise ValueError(f"Stripe issues no credit note on a {inv['status']} invoice")
        credited = sum(inv.get(f"{when}_payment_credit_notes_amount") or 0 for when in ("pre", "post"))
        if credited + amount > inv["total"]:
            raise ValueError(f"credit notes of {credited + amount} exceed the invoice's total {inv['total']}")
        pre = min(amount, inv["amount_remaining"])
        inv.update(amount_due=inv["amount_due"] - pre, amount_remaining=inv["amount_remaining"] - pre,
                   pre_payment_credit_notes_amount=(inv.get("pre_payment_credit_notes_amount") or 0) + pre,
                   post_payment_credit_notes_amount=(inv.get("post_payment_credit_notes_amount") or 0) + amount - pre)
        if pre and inv["amount_remaining"] == 0:
            inv.update(status="paid", status_transitions={**(inv.get("status_transitions") or {}),
                                                          "paid_at": int(time.time())})

    def fail_invoice(self, invoice_id: str, customer: str, decline_code: str, amount: int,
                     status: str = "requires_payment_method") -> dict[str, Any]:
        """Stripe's automatic attempt at the invoice, declined by the issuer: a payment intent waiting
        for another payment method, with the decline on its last_payment_error (or, ``status``
        "requires_action", an off-session renewal the issuer wants authenticated), and the invoice's
        open payment naming it. The intent."""
        now = int(time.time())
        charge, method = unique("ch"), resource("payment_method")
        method.update(id=unique("pm"), customer=customer)
        pi = resource("payment_intent")
        pi.update(id=unique("pi"), amount=amount, currency="usd", customer=customer, payment_method=None,
                  status=status, latest_charge=charge, created=now, metadata={},
                  last_payment_error={"type": "card_error", "code": "card_declined", "decline_code": decline_code,
                                      "message": "Your card was declined.", "charge": charge,
                                      "payment_method": method})
        self.intents[pi["id"]] = pi
        payment = resource("invoice_payment")
        payment.update(id=unique("inpay"), invoice=invoice_id, amount_paid=None, amount_requested=amount,
                       currency="usd", status="open", is_default=True, created=now,
                       payment={"type": "payment_intent", "payment_intent": pi["id"]},
                       status_transitions={"canceled_at": None, "paid_at": None})
        self.payments_by_invoice.setdefault(invoice_id, []).append(payment)
        return pi

    def set_lines(self, invoice_id: str, lines: list[tuple[str, int]]) -> list[dict[str, Any]]:
        """Stripe's whole list of the invoice's line items, each (product, amount) in this order, on
        the subscription's items (line_item's parent shape). The lines, as Stripe lists them."""
        made = []
        for product, amount in lines:
            line = resource("line_item")
            line.update(id=unique("il"), invoice=invoice_id, amount=amount,
                        pricing={"type": "price_details", "unit_amount_decimal": None,
                                 "price_details": {"price": f"price_{product}", "product": product}})
            line["parent"]["subscription_item_details"]["subscription_item"] = unique("si")
            made.append(line)
        self.lines_by_invoice[invoice_id] = made
        return made

    def intents_created(self) -> list[Call]:
        return [c for c in self.calls if c.path == "/v1/payment_intents" and not c.replayed]

    def invoice_payments(self) -> list[Call]:
        return [c for c in self.calls if c.path.endswith("/pay") and not c.replayed]

    # --- the API ----------------------------------------------------------------------------

    def handle(self, method: str, path: str, key: str | None, params: dict[str, str]) -> Answer:
        with self._lock:
            replay = self._answers.get(key) if key else None
            if replay is not None and key and self._answered_for[key] != (method, path, params):
                self.calls.append(Call(method, path, key, params, False))
                return 400, {"error": {"type": "idempotency_error", "message": (
                    "Keys for idempotent requests can only be used with the same parameters they were first "
                    f"used with. Try using a key other than '{key}'.")}}
            self.calls.append(Call(method, path, key, params, replay is not None))
            if replay is not None:
                return replay
            answer = self._route(method, path, params)
            # Stripe keeps the result of a request that ran (5xx included) for its idempotency key;
            # a rate-limited one was refused before it ran: nothing is kept, the key may be sent again.
            if key and method == "POST" and answer[0] != 429:
                self._answers[key] = answer
                self._answered_for[key] = (method, path, params)
            return answer

    def _route(self, method: str, path: str, params: dict[str, str]) -> Answer:
        parts = path.split("?")[0].strip("/").split("/")
        if method == "POST" and parts == ["v1", "payment_intents"]:
            return self._create_intent(params)
        if method == "GET" and parts == ["v1", "invoice_payments"]:
            if self.invoice_payments_down:
                return 500, {"error": {"type": "api_error", "message": "An unknown error occurred"}}
            if self.invoice_payments_rate_limited:
                return RATE_LIMITED
            if params.get("invoice") in self.unknown_invoices:
                return 404, {"error": {"type": "invalid_request_error", "code": "resource_missing",
                                       "message": f"No such invoice: '{params['invoice']}'", "param": "invoice"}}
            listed = self.payments_by_invoice.get(params.get("invoice", ""), [])
            return 200, {"object": "list", "url": "/v1/invoice_payments", "has_more": False, "data": listed}
        if method == "GET" and parts == ["v1", "payment_intents"]:
            return self._list_intents(params)
        if len(parts) >= 3 and parts[:2] == ["v1", "payment_intents"] and parts[2] in self.intents:
            if method == "GET" and len(parts) == 3:
                return 200, self.intents[parts[2]]
            if method == "POST" and parts[3:] == ["cancel"]:
                return self._cancel_intent(parts[2], params)
        if method == "GET" and len(parts) == 4 and parts[:2] == ["v1", "invoices"] and parts[3] == "lines":
            return self._list_lines(parts[2], params)
        if len(parts) >= 3 and parts[:2] == ["v1", "invoices"] and parts[2] in self.invoices:
            if method == "GET" and len(parts) == 3:
                return 200, self.invoices[parts[2]]
            if method == "POST" and parts[3:] == ["pay"]:
                return self._pay_invoice(parts[2], params)
        return 404, {"error": {"type": "invalid_request_error", "code": "resource_missing",
                               "message": f"No such resource: {path}"}}

    def _intent(self, params: dict[str, str], status: str) -> dict[str, Any]:
        pi = resource("payment_intent")
        pi.update(id=unique("pi"), amount=int(params.get("amount", 0)), currency=params.get("currency", "usd"),
                  customer=params.get("customer"), payment_method=params.get("payment_method"), status=status,
                  metadata={k[len("metadata["):-1]: v for k, v in params.items() if k.startswith("metadata[")},
                  latest_charge=unique("ch"), last_payment_error=None, created=int(time.time()))
        self.intents[pi["id"]] = pi
        return pi

    def _list_intents(self, params: dict[str, str]) -> Answer:
        since = int(params.get("created[gte]", 0))
        found = [pi for pi in self.intents.values()
                 if pi["customer"] == params.get("customer") and pi["created"] >= since]
        found.sort(key=lambda pi: pi["created"], reverse=True)
        limit = int(params.get("limit", 10))
        return 200, {"object": "list", "url": "/v1/payment_intents", "has_more": len(found) > limit,
                     "data": found[:limit]}

    def _list_lines(self, invoice_id: str, params: dict[str, str]) -> Answer:
        if self.invoice_lines_down or invoice_id in self.invoice_lines_down_for:
            return 500, {"error": {"type": "api_error", "message": "An unknown error occurred"}}
        if self.invoice_lines_rate_limited:
            return RATE_LIMITED
        if invoice_id not in self.lines_by_invoice:
            return 404, {"error": {"type": "invalid_request_error", "code": "resource_missing",
                                   "message": f"No such invoice: '{invoice_id}'", "param": "invoice"}}
        lines = self.lines_by_invoice[invoice_id]
        limit = int(params.get("limit", 10))
        if not 1 <= limit <= 100:
            return 400, {"error": {"type": "invalid_request_error", "param": "limit",
                                   "message": "This value must be less than or equal to 100."}}
        start = 0
        if "starting_after" in params:
            ids = [line["id"] for line in lines]
            if params["starting_after"] not in ids:
                return 400, {"error": {"type": "invalid_request_error", "param": "starting_after",
                                       "message": f"Invalid starting_after id: {params['starting_after']}"}}
            start = ids.index(params["starting_after"]) + 1
        page = lines[start:start + limit]
        return 200, {"object": "list", "url": f"/v1/invoices/{invoice_id}/lines",
                     "has_more": start + limit < len(lines), "data": page}

    def _cancel_intent(self, intent_id: str, params: dict[str, str]) -> Answer:
        intent = self.intents[intent_id]
        if intent["status"] in ("succeeded", "canceled"):
            return 400, {"error": {"type": "invalid_request_error", "code": "payment_intent_unexpected_state",
                                   "message": f"This PaymentIntent's status is {intent['status']}"}}
        intent.update(status="canceled", cancellation_reason=params.get("cancellation_reason"),
                      canceled_at=int(time.time()))
        return 200, intent

    def _create_intent(self, params: dict[str, str]) -> Answer:
        if self.before_answer is not None:
            self.before_answer()
        outcome = self.intent_outcome
        if outcome == "rate_limited":
            return RATE_LIMITED
        if (self.redirect_methods_enabled and params.get("confirm") == "true" and "return_url" not in params
                and params.get("automatic_payment_methods[allow_redirects]") != "never"
                and not any(k.startswith("payment_method_types") for k in params)):
            return 400, {"error": {"type": "invalid_request_error", "message": RETURN_URL_REQUIRED}}
        currency, amount = params.get("currency", "usd").lower(), int(params.get("amount", 0))
        if currency in THREE_DECIMAL and amount % 10:
            return 400, {"error": {"type": "invalid_request_error", "code": "invalid_charge_amount",
                                   "param": "amount", "message": (
                                       f"Card payments in {currency.upper()} must be rounded to the nearest ten "
                                       f"minor units (the last digit 0); {amount} is not.")}}
        if outcome == "server_error_after_charge":
            self.charged_behind_errors.append(self._intent(params, "succeeded"))
        if outcome in ("succeeded", "processing"):
            return 200, self._intent(params, outcome)
        if outcome == "decline":
            pi = self._intent(params, "requires_payment_method")
            error = {"type": "card_error", "code": "card_declined", "decline_code": self.decline_code,
                     "message": "Your card was declined.", "charge": pi["latest_charge"]}
            pi["last_payment_error"] = dict(error)
            return 402, {"error": {**error, "payment_intent": pi}}
        return 500, {"error": {"type": "api_error", "message": "An unknown error occurred"}}

    def _pay_invoice(self, invoice_id: str, params: dict[str, str]) -> Answer:
        if self.before_paying is not None:
            self.before_paying()
        inv = self.invoices[invoice_id]
        if inv["status"] in ("paid", "void"):
            return 400, {"error": {"type": "invalid_request_error", "code": "invoice_not_open",
                                   "message": "Invoice is already paid"}}
        if self.pay_outcome == "server_error":
            return 500, {"error": {"type": "api_error", "message": "An unknown error occurred"}}
        if self.pay_outcome == "rate_limited":
            return RATE_LIMITED
        if params.get("paid_out_of_band") != "true":
            return 400, {"error": {"type": "invalid_request_error", "message": "this fake pays out of band only"}}
        inv.update(status="paid", amount_paid=inv["amount_due"], amount_remaining=0)
        inv["status_transitions"] = {**(inv.get("status_transitions") or {}), "paid_at": int(time.time())}
        if self.pay_outcome == "server_error_after_pay":
            return 500, {"error": {"type": "api_error", "message": "An unknown error occurred"}}
        return 200, inv
