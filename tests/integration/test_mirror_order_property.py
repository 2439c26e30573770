"""Property: the mirror rows of one invoice, its payment intent, its customer and payment method do
not depend on the order Stripe delivers their events in, nor on redeliveries.

Stripe sends several events of one object in the same second (invoice.finalized and
invoice.payment_failed of an invoice charged at finalisation; charge.failed and
payment_intent.payment_failed; invoice.paid, invoice.payment_succeeded and invoice_payment.paid),
retries an invoice on the same payment intent (its charges, a 3-D Secure failure that makes none),
and ends an invoice paid, void, or uncollectible and then paid. An invoice event may carry its first
lines only (``lines.has_more``), a draft's event (drafted earlier, or in the finalisation's second)
other lines than the final ones, and beat's fetch of the whole list (app/payments/invoice_lines.py
STORE) may land anywhere among the deliveries: the whole list wins in any order. Each generated history is ingested
(webhooks/store.ingest_events, the real statement on the real database, one event per delivery as
the webhook does) once in order and once shuffled with redeliveries; the rows must be equal.
The per-order tests of tests/integration/test_order_independence.py pin single cases through the
whole recompute; this one covers the merge rules' combinations at the mirror.
"""

from __future__ import annotations

import itertools
import json
import time
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg2.extras import Json
from sqlalchemy import Connection

from app.payments.invoice_lines import STORE
from tests.stripe_events import event, unique, with_product
from webhooks import store
from webhooks.mirror import extract, invoice_lines

DAY = 86400
BASE = int(time.time()) - 30 * DAY
DECLINES = ["insufficient_funds", "expired_card", "do_not_honor", "lost_card", "a_code_from_the_future"]
ADVICE = [None, "try_again_later", "do_not_try_again"]
ENDINGS = ["open", "paid", "void", "uncollectible", "uncollectible_then_paid"]
Step = tuple[str, int, dict[str, Any]]  # (event type, created, parameters)
# The invoice's whole list of lines (product, amount) and what a draft of it held before finalisation.
WHOLE = [("prod_core", 3000), ("prod_premium", 1500), ("prod_addon", 500)]
DRAFT = [("prod_core", 3000)]
FIRST = 1  # lines in an event that carries the first ones only (has_more)
LINES = ["whole", "first", "mixed"]  # what the finalised invoice's events carry


@st.composite
def histories(draw: Any) -> list[Step]:
    """One invoice of one customer and the attempts on its one payment intent, in Stripe's order;
    ties in the same second are common by construction."""
    steps: list[Step] = []
    t = BASE
    lines = draw(st.sampled_from(LINES))

    def more() -> bool:
        return lines == "first" or (lines == "mixed" and draw(st.booleans()))

    if draw(st.booleans()):  # its draft (invoice.created/updated), in the finalisation's second or before
        steps.append(("invoice.draft", t - draw(st.sampled_from([0, 1, DAY])), {"more": draw(st.booleans())}))
    steps.append(("invoice.finalized", t, {"more": more()}))
    method, last_charge = "pm_a", None
    for k in range(draw(st.integers(1, 3))):
        if k:  # the next confirmation on the intent: after every event of the one before, or in its second
            t = max(created for _, created, _ in steps) + draw(st.sampled_from([0, 1, DAY, 2 * DAY]))
        steps.append(("invoice.payment_failed", t, {"attempt_count": k + 1, "more": more()}))
        if draw(st.integers(0, 4)) == 0:  # 3-D Secure failed: no charge; latest_charge names the previous one
            steps.append(("payment_intent.payment_failed", t + draw(st.integers(0, 1)),
                          {"charge": last_charge, "names_charge": False, "pm": draw(st.sampled_from([method, None])),
                           "code": "payment_intent_authentication_failure", "decline": None, "advice": None}))
            continue
        charge = last_charge = f"ch{k}"
        decline, advice = draw(st.sampled_from(DECLINES)), draw(st.sampled_from(ADVICE))
        steps.append(("charge.failed", t + draw(st.integers(0, 1)),
                      {"charge": charge, "pm": method, "decline": decline, "advice": advice,
                       "blocked": draw(st.booleans())}))
        # The intent's view of the same decline: in the same second or a little later; its codes may
        # differ from the charge's (Radar's reason on the charge, the issuer's on the intent).
        steps.append(("payment_intent.payment_failed", t + draw(st.integers(0, 2)),
                      {"charge": charge, "names_charge": draw(st.booleans()),
                       "pm": draw(st.sampled_from([method, None])),
                       "code": "card_declined", "decline": draw(st.sampled_from([decline, *DECLINES])),
                       "advice": advice}))
        shown, changed = method, None
        if draw(st.booleans()):  # the customer attaches another card and makes it the default
            t += draw(st.sampled_from([1, DAY]))
            method = f"pm_{k}"
            changed = t + draw(st.integers(0, 1))
            steps.append(("payment_method.attached", t, {"pm": method}))
            steps.append(("customer.updated", changed, {"pm": method, "changed": True}))
        if draw(st.booleans()):  # the delinquent flag: a customer.updated that changes no method
            at = t + draw(st.integers(0, 1))
            # in the second of a change it may be from just before it, showing the previous default
            pm = draw(st.sampled_from([method, shown])) if at == changed else method if changed is None or \
                at > changed else shown
            steps.append(("customer.updated", at, {"pm": pm, "changed": False}))
    ending = draw(st.sampled_from(ENDINGS))
    t += draw(st.sampled_from([1, DAY]))
    if ending.startswith("uncollectible"):
        steps.append(("invoice.marked_uncollectible", t, {"more": more()}))
        t += draw(st.sampled_from([1, DAY]))
    if ending.endswith("paid"):
        for kind in ("invoice.paid", "invoice.payment_succeeded", "invoice_payment.paid"):
            steps.append((kind, t, {"more": more()}))
    elif ending == "void":
        steps.append(("invoice.voided", t, {"more": more()}))
    steps.sort(key=lambda s: s[1])
    return steps


def render(kind: str, t: int, p: dict[str, Any], n: int, s: str) -> dict[str, Any]:
    """The event of a step, with ids unique to one delivery order (suffix ``s``)."""
    eid, customer, invoice, intent = f"evt{n}_{s}", f"cus_{s}", f"in_{s}", f"pi_{s}"
    if kind.startswith("invoice."):
        paid = kind in ("invoice.paid", "invoice.payment_succeeded")
        # A draft's event: no derived fixture of invoice.created/updated, so invoice.finalized's
        # shape with the draft's status and lines.
        draft = kind == "invoice.draft"
        evt = event("invoice.finalized" if draft else kind, event_id=eid, created=t, id=invoice, customer=customer,
                    billing_reason="subscription_cycle", amount_due=5000, amount_paid=5000 if paid else 0,
                    amount_remaining=0 if paid else 5000, attempt_count=p.get("attempt_count", 0),
                    paths={"created": BASE - DAY, **({"status": "draft"} if draft else {})})
        evt = with_product(evt, "prod_core", 5000)
        items = line_items(evt, invoice, DRAFT if draft else WHOLE)
        evt["data"]["object"]["lines"].update(data=items[:FIRST] if p.get("more") else items,
                                              has_more=bool(p.get("more")))
        return evt
    if kind == "invoice_payment.paid":
        return event(kind, event_id=eid, created=t, invoice=invoice, amount_paid=5000,
                     paths={"payment.payment_intent": intent, "created": t})
    if kind == "charge.failed":
        outcome = {"type": "blocked", "reason": "highest_risk_level"} if p["blocked"] else \
            {"type": "issuer_declined", "reason": p["decline"]}
        return event(kind, event_id=eid, created=t, id=f"{p['charge']}_{s}", customer=customer,
                     payment_intent=intent, payment_method=f"{p['pm']}_{s}", amount=5000,
                     failure_code="card_declined",
                     paths={"created": t, "outcome.advice_code": p["advice"],
                            **{f"outcome.{k}": v for k, v in outcome.items()}})
    if kind == "payment_intent.payment_failed":
        charge = f"{p['charge']}_{s}" if p["charge"] else None
        error: dict[str, Any] = {"code": p["code"], "decline_code": p["decline"], "advice_code": p["advice"]}
        if p["pm"]:  # else as the fixture's stub, and the intent's own payment_method null after a failure
            error["payment_method"] = {"id": f"{p['pm']}_{s}"}
        if p["names_charge"]:
            error["charge"] = charge
        return event(kind, event_id=eid, created=t, id=intent, customer=customer, latest_charge=charge,
                     amount=5000, paths={f"last_payment_error.{k}": v for k, v in error.items()})
    if kind == "payment_method.attached":
        return event(kind, event_id=eid, created=t, id=f"{p['pm']}_{s}", customer=customer)
    assert kind == "customer.updated"
    evt = event(kind, event_id=eid, created=t, id=customer,
                paths={"invoice_settings.default_payment_method": f"{p['pm']}_{s}"})
    evt["data"]["previous_attributes"] = (
        {"invoice_settings": {"default_payment_method": None}} if p["changed"] else {"delinquent": False})
    return evt


def line_items(evt: dict[str, Any], invoice: str, lines: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """The invoice's line items (the event's first line's shape), each (product, amount), ids stable
    per invoice so that every event and beat's fetch list the same lines."""
    first = evt["data"]["object"]["lines"]["data"][0]
    items = []
    for n, (product, amount) in enumerate(lines):
        item = json.loads(json.dumps(first))
        item.update(id=f"il{n}_{invoice}", invoice=invoice, amount=amount,
                    pricing={"type": "price_details", "unit_amount_decimal": None,
                             "price_details": {"price": f"price_{product}", "product": product}})
        items.append(item)
    return items


def fetch_lines(conn: Connection, s: str) -> None:
    """Beat's pass storing the whole list Stripe lists for the invoice (its STORE statement)."""
    invoice = f"in_{s}"
    evt = render("invoice.finalized", BASE, {}, -1, s)
    subscription = conn.exec_driver_sql("SELECT subscription_id FROM stripe_invoice WHERE id = %(i)s",
                                        {"i": invoice}).scalar()
    lines = invoice_lines(line_items(evt, invoice, WHOLE), subscription)
    conn.exec_driver_sql(STORE, {"id": invoice, "lines": Json(lines)})


SUCCEEDED_UNREAD = ("charge_id", "decline_code", "failure_code", "advice_code", "payment_method_id")
ROWS = {
    "stripe_invoice": "id = %(s)s",
    "stripe_payment_attempt": "id = %(s)s",
    "stripe_payment_method": "id LIKE %(like)s",
    "stripe_customer_state": "stripe_customer_id = %(s)s",
}


def mirror(conn: Connection, s: str) -> str:
    keys = {"stripe_invoice": f"in_{s}", "stripe_payment_attempt": f"pi_{s}",
            "stripe_customer_state": f"cus_{s}"}
    out = {}
    for table, where in ROWS.items():
        rows = conn.exec_driver_sql(f"SELECT * FROM {table} WHERE {where} ORDER BY 1",
                                    {"s": keys.get(table), "like": f"%\\_{s}"}).mappings().all()
        # source_event_id names the event that last wrote the row, one of a second's events on a tie;
        # nothing reads it.
        # A succeeded attempt's outcome codes, the charge they are about and its method are no
        # failure's: compute and the mandates read failed attempts' only (a charge's method is read
        # from charges). Once invoice_payment.paid (which names neither charge nor method) is in,
        # an older failure delivered late can still fill them: which one depends on the order.
        out[table] = [{k: v for k, v in r.items() if k != "source_event_id" and not (
            r.get("status") == "succeeded" and k in SUCCEEDED_UNREAD)} for r in rows]
    return json.dumps(out, default=str, sort_keys=True).replace(s, "S")


def deliver(conn: Connection, evt: dict[str, Any]) -> None:
    raw = json.dumps(evt)
    store.ingest_events(conn, [(extract(json.loads(raw)), raw)])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=histories(), data=st.data())
def test_mirror_rows_do_not_depend_on_delivery_order_or_redelivery(history, data, conn):
    order = data.draw(st.permutations(range(len(history))))
    deliveries = list(order)
    for again in data.draw(st.lists(st.integers(0, len(history) - 1), max_size=4)):
        deliveries.insert(data.draw(st.integers(0, len(deliveries))), again)
    # Beat's fetch of the whole list: after every delivery in Stripe's order; anywhere among the
    # shuffled ones (before the invoice is mirrored it stores nothing), and again at the end, as its
    # next pass does while the invoice is incomplete.
    fetched = data.draw(st.booleans())
    FETCH = -1
    if fetched:
        deliveries.insert(data.draw(st.integers(0, len(deliveries))), FETCH)
    finals = []
    for sequence in (range(len(history)), deliveries):
        s = unique("o")
        for n in sequence:
            if n == FETCH:
                fetch_lines(conn, s)
                continue
            kind, t, params = history[n]
            deliver(conn, render(kind, t, params, n, s))
        if fetched:
            fetch_lines(conn, s)
        finals.append(mirror(conn, s))
    a, b = json.loads(finals[0]), json.loads(finals[1])
    differ = {t: [(k, x.get(k), y.get(k)) for x, y in zip(a[t], b[t], strict=False) for k in x if x[k] != y.get(k)]
              for t in a if a[t] != b[t]}
    assert finals[1] == finals[0], (differ, [history[n][:2] if n >= 0 else "fetch" for n in deliveries])
    # The whole list once a finalised event carried it or beat fetched it; else the first lines of
    # the finalised invoice's events (never the draft's), incomplete.
    final = json.loads(finals[0])["stripe_invoice"][0]
    whole = fetched or any(not p.get("more") for kind, _, p in history
                           if kind.startswith("invoice.") and kind != "invoice.draft")
    assert ([ln["product"] for ln in final["lines"]], final["lines_incomplete"]) == (
        ([p for p, _ in WHOLE], False) if whole else ([p for p, _ in WHOLE[:FIRST]], True)), history


def test_a_3ds_failure_in_the_same_second_as_the_intents_previous_decline_wins_in_any_order(conn):
    """A reused intent: its charge ch0 declined (the charge's event and the intent's), and the next
    confirmation on the intent failed 3-D Secure in the same second as the intent's decline event
    (no charge; latest_charge still names ch0, so it came after ch0). The two failures tie on the
    ordering key: the stored outcome must not be whichever was delivered last. The failure that
    made no charge wins (the customer must act), as it does a second later."""
    t = BASE + DAY
    history: list[Step] = [
        ("charge.failed", t, {"charge": "ch0", "pm": "pm_a", "decline": "insufficient_funds", "advice": None,
                              "blocked": False}),
        ("payment_intent.payment_failed", t + 1, {"charge": "ch0", "names_charge": False, "pm": "pm_a",
                                                  "code": "card_declined", "decline": "insufficient_funds",
                                                  "advice": None}),
        ("payment_intent.payment_failed", t + 1, {"charge": "ch0", "names_charge": False, "pm": "pm_a",
                                                  "code": "payment_intent_authentication_failure",
                                                  "decline": None, "advice": None}),
    ]
    columns = ("status", "charge_id", "decline_code", "failure_code", "advice_code", "failed_at")
    for order, row in _attempt_in_every_order(conn, history, columns).items():
        assert row == {"status": "failed", "charge_id": None, "decline_code": None,
                       "failure_code": "payment_intent_authentication_failure", "advice_code": None,
                       "failed_at": datetime.fromtimestamp(t + 1, UTC)}, order


def test_a_declined_charges_method_is_the_attempts_in_any_order_where_its_intent_names_none(conn):
    """A reused intent: ch0 declined on pm_a, a day later ch1 on pm_b (the customer's new card). The
    intent's failure events name the declined charge (latest_charge, it has a decline_code) but no
    method (the fixture's last_payment_error is a stub; the intent's own payment_method is null
    after a failure). The attempt's method is its latest failure's, pm_b, in every order: the
    mandates and the retry after a card change read it (a decline on pm_b attributed to pm_a made
    pm_b look fresh)."""
    t = BASE + DAY
    ch = {"decline": "insufficient_funds", "advice": None, "blocked": False}
    history: list[Step] = [
        ("charge.failed", t, {"charge": "ch0", "pm": "pm_a", **ch}),
        ("payment_intent.payment_failed", t + 2, {"charge": "ch0", "names_charge": False, "pm": None,
                                                  "code": "card_declined", "decline": "insufficient_funds",
                                                  "advice": None}),
        ("charge.failed", t + DAY, {"charge": "ch1", "pm": "pm_b", **ch}),
        ("payment_intent.payment_failed", t + DAY + 2, {"charge": "ch1", "names_charge": False, "pm": None,
                                                        "code": "card_declined", "decline": "insufficient_funds",
                                                        "advice": None}),
    ]
    for order in itertools.permutations(range(len(history))):
        s = unique("o")
        for n in order:
            kind, created, params = history[n]
            deliver(conn, render(kind, created, params, n, s))
        row = conn.exec_driver_sql("SELECT status, charge_id, payment_method_id FROM stripe_payment_attempt "
                                   "WHERE id = %(p)s", {"p": f"pi_{s}"}).mappings().one()
        assert dict(row) == {"status": "failed", "charge_id": f"ch1_{s}", "payment_method_id": f"pm_b_{s}"}, order


def test_a_default_method_change_wins_a_same_second_customer_update_in_any_order(conn):
    """The customer makes pm_new the default (customer.updated naming it in previous_attributes) in
    the same second as another customer.updated (the delinquent flag) sent just before it, which
    still shows pm_old. Same second, same rank: the last delivered must not decide the default
    the retry after a card change goes by. The event that reports the change shows the state
    after it, so it wins the tie."""
    t = BASE + DAY
    history: list[Step] = [("customer.updated", t, {"pm": "pm_old", "changed": False}),
                           ("customer.updated", t, {"pm": "pm_new", "changed": True})]
    for order in itertools.permutations(range(len(history))):
        s = unique("o")
        for n in order:
            kind, created, params = history[n]
            deliver(conn, render(kind, created, params, n, s))
        row = conn.exec_driver_sql("SELECT default_payment_method_id, changed_at FROM stripe_customer_state "
                                   "WHERE stripe_customer_id = %(c)s", {"c": f"cus_{s}"}).mappings().one()
        assert dict(row) == {"default_payment_method_id": f"pm_new_{s}",
                             "changed_at": datetime.fromtimestamp(t, UTC)}, order


def _attempt_in_every_order(conn: Connection, history: list[Step],
                            columns: tuple[str, ...] = ("charge_id", "failure_code", "decline_code",
                                                        "payment_method_id")) -> dict[tuple[int, ...], dict[str, Any]]:
    """The attempt row's ``columns`` (by default its outcome and card) after each delivery order of
    ``history`` (ids unsuffixed)."""
    seen = {}
    for order in itertools.permutations(range(len(history))):
        s = unique("o")
        for n in order:
            kind, created, params = history[n]
            deliver(conn, render(kind, created, params, n, s))
        row = conn.exec_driver_sql(f"SELECT {', '.join(columns)} FROM stripe_payment_attempt WHERE id = %(p)s",
                                   {"p": f"pi_{s}"}).mappings().one()
        seen[order] = {k: v.replace(f"_{s}", "") if isinstance(v, str) else v for k, v in row.items()}
    return seen


def test_a_3ds_failure_on_a_new_card_in_the_second_of_the_old_cards_decline_keeps_its_card_in_any_order(conn):
    """A reused intent: ch0 declined on pm_a; the customer enters pm_b, whose 3-D Secure fails (no
    charge; latest_charge still ch0) in the same second as the intent's event about ch0's decline.
    The failure that made no charge wins the tie, and with it the card it names: pm_b in every order
    (the retry after a card change reads the attempt's card: pm_a blamed for the failed
    authentication made pm_b look untried, and earned it a free retry that fails the same way)."""
    t = BASE + DAY
    history: list[Step] = [
        ("charge.failed", t, {"charge": "ch0", "pm": "pm_a", "decline": "insufficient_funds", "advice": None,
                              "blocked": False}),
        ("payment_intent.payment_failed", t + 1, {"charge": "ch0", "names_charge": False, "pm": "pm_a",
                                                  "code": "card_declined", "decline": "insufficient_funds",
                                                  "advice": None}),
        ("payment_intent.payment_failed", t + 1, {"charge": "ch0", "names_charge": False, "pm": "pm_b",
                                                  "code": "payment_intent_authentication_failure",
                                                  "decline": None, "advice": None}),
    ]
    for order, row in _attempt_in_every_order(conn, history).items():
        assert row == {"charge_id": None, "failure_code": "payment_intent_authentication_failure",
                       "decline_code": None, "payment_method_id": "pm_b"}, order


def test_a_3ds_failure_before_the_intents_first_charge_in_the_same_second_loses_to_it_in_any_order(conn):
    """The intent's first confirmation fails 3-D Secure (no charge: latest_charge null), the next one
    is declined (ch1) in the same second; ch1's own charge.failed comes a second later (Radar blocked
    it: its reason is no decline code, the intent's event has the issuer's). The failure that made
    none came first (its latest_charge is not ch1): ch1's decline is the outcome, with the intent's
    decline code, in every order."""
    t = BASE + DAY
    history: list[Step] = [
        ("payment_intent.payment_failed", t, {"charge": None, "names_charge": False, "pm": "pm_a",
                                              "code": "payment_intent_authentication_failure", "decline": None,
                                              "advice": None}),
        ("payment_intent.payment_failed", t, {"charge": "ch1", "names_charge": False, "pm": "pm_a",
                                              "code": "card_declined", "decline": "insufficient_funds",
                                              "advice": None}),
        ("charge.failed", t + 1, {"charge": "ch1", "pm": "pm_a", "decline": "insufficient_funds", "advice": None,
                                  "blocked": True}),
    ]
    for order, row in _attempt_in_every_order(conn, history).items():
        assert row == {"charge_id": "ch1", "failure_code": "card_declined", "decline_code": "insufficient_funds",
                       "payment_method_id": "pm_a"}, order


def test_a_3ds_failure_naming_no_card_takes_the_card_of_the_charge_before_it_in_any_order(conn):
    """ch0 declined on pm_a, a day later ch1 on pm_b (the customer's new card), then a confirmation
    fails 3-D Secure naming no card (latest_charge ch1). The attempt's card is ch1's, pm_b, as in
    Stripe's order, also when the failure is delivered before ch1's events (it kept pm_a, and ch1's
    older events could not correct it)."""
    t = BASE + DAY
    ch = {"decline": "insufficient_funds", "advice": None, "blocked": False}
    history: list[Step] = [
        ("charge.failed", t, {"charge": "ch0", "pm": "pm_a", **ch}),
        ("charge.failed", t + DAY, {"charge": "ch1", "pm": "pm_b", **ch}),
        ("payment_intent.payment_failed", t + DAY, {"charge": "ch1", "names_charge": True, "pm": "pm_b",
                                                    "code": "card_declined", "decline": "insufficient_funds",
                                                    "advice": None}),
        ("payment_intent.payment_failed", t + 2 * DAY, {"charge": "ch1", "names_charge": False, "pm": None,
                                                        "code": "payment_intent_authentication_failure",
                                                        "decline": None, "advice": None}),
    ]
    for order, row in _attempt_in_every_order(conn, history).items():
        assert row == {"charge_id": None, "failure_code": "payment_intent_authentication_failure",
                       "decline_code": None, "payment_method_id": "pm_b"}, order
