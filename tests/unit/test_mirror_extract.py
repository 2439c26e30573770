"""webhooks/mirror.py extract: a signed event of any shape is mirrored, refused as not an event, or
refused as holding a value out of range, and never raises anything else (which would be a 500, and
Stripe would redeliver it forever)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.stripe_events import event
from webhooks.mirror import NotAStripeEvent, OutOfRange, extract

TYPES = ("invoice.payment_failed", "invoice.paid", "invoice.voided", "invoice.marked_uncollectible", "charge.failed",
         "payment_intent.payment_failed", "customer.subscription.updated", "customer.subscription.deleted",
         "payment_method.attached")
BASES = {t: event(t, event_id="evt_1", customer="cus_1", created=1_700_000_000) for t in TYPES}

# What a leaf of a Stripe object can be replaced by: every JSON kind, and the numbers Python's decoder
# reads that no column holds (Infinity, NaN, beyond 64 bits, milliseconds where seconds belong).
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([2**70, 10**12, -1]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
    st.just([]), st.just({}), st.lists(st.integers(), max_size=2), st.dictionaries(st.sampled_from(["id", "a"]),
                                                                                    st.integers(), max_size=2))


def paths(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from paths(inner, (*at, key))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from paths(inner, (*at, i))
    if at:
        yield at


@settings(max_examples=400, deadline=None)
@given(event_type=st.sampled_from(TYPES), data=st.data())
def test_any_shape_is_mirrored_or_refused_with_a_reason(event_type: str, data: st.DataObject):
    evt = copy.deepcopy(BASES[event_type])
    every = list(paths(evt))
    for path in data.draw(st.lists(st.sampled_from(every), min_size=1, max_size=3)):
        holder = evt
        try:
            for key in path[:-1]:
                holder = holder[key]
            holder[path[-1]] = data.draw(VALUES)
        except (KeyError, IndexError, TypeError):  # an earlier change replaced a parent
            continue
    try:
        extracted = extract(evt)
    except (NotAStripeEvent, OutOfRange):
        return
    assert extracted.event_id == str(evt["id"])


def test_only_an_invoice_sent_for_payment_keeps_a_due_date():
    """Stripe: due_date is null where collection_method is charge_automatically. A payload that holds
    one anyway (the fixture does: 2009) must not make a card-charged invoice overdue since then."""
    charged = event("invoice.payment_failed", customer="cus_1", collection_method="charge_automatically")
    sent = event("invoice.payment_failed", customer="cus_1", collection_method="send_invoice")
    assert charged["data"]["object"]["due_date"] and sent["data"]["object"]["due_date"]
    [charged_row], [sent_row] = extract(charged).rows, extract(sent).rows
    assert charged_row.values["due_date"] is None
    assert sent_row.values["due_date"] is not None


def test_only_credit_issued_after_payment_counts_as_credited():
    """A credit note before payment already lowered what was due: counted again, a customer-paid
    invoice would read as credited back (Resolved) in the billing history."""
    before = event("invoice.paid", customer="cus_1", pre_payment_credit_notes_amount=6000,
                   post_payment_credit_notes_amount=0)
    after = event("invoice.paid", customer="cus_1", pre_payment_credit_notes_amount=0,
                  post_payment_credit_notes_amount=4000)
    assert extract(before).rows[0].values["credited_amount"] == 0
    assert extract(after).rows[0].values["credited_amount"] == 4000


def test_a_charges_outcome_reason_is_a_decline_code_only_for_an_issuers_decline():
    """charge.outcome.reason is the issuer's decline code when outcome.type is issuer_declined; for a
    payment Radar blocked it is Radar's reason (highest_risk_level, rule), and for one Stripe never
    sent to the network (invalid) no decline at all. Read as a decline code, a Radar block classifies
    unknown and outweighs the intent's own decline code (fraudulent)."""
    def charge(kind: str, reason: str) -> dict[str, Any]:
        return event("charge.failed", customer="cus_1", payment_intent="pi_1", failure_code="card_declined",
                     paths={"outcome.type": kind, "outcome.reason": reason})

    for kind, reason in (("blocked", "highest_risk_level"), ("blocked", "rule"), ("invalid", "invalid_request")):
        row = extract(charge(kind, reason)).rows[0].values
        assert (row["decline_code"], row["failure_code"]) == (None, "card_declined"), (kind, reason)
    row = extract(charge("issuer_declined", "insufficient_funds")).rows[0].values
    assert (row["decline_code"], row["failure_code"]) == ("insufficient_funds", "card_declined")


def test_a_failed_intent_is_about_the_charge_its_error_names():
    """A reused intent whose 3-D Secure failed made no charge: its latest_charge still names the
    previous (declined) charge, and only last_payment_error.charge says which charge the failure is
    about (none). The row must say so, or the earlier charge's decline code survives the merge."""
    declined = event("payment_intent.payment_failed", id="pi_1", customer="cus_1", latest_charge="ch_1",
                     paths={"last_payment_error.charge": "ch_1"})
    authentication = event("payment_intent.payment_failed", id="pi_1", customer="cus_1", latest_charge="ch_1",
                           paths={"last_payment_error.type": "invalid_request_error",
                                  "last_payment_error.code": "payment_intent_authentication_failure",
                                  "last_payment_error.decline_code": None})
    succeeded = event("payment_intent.payment_failed", id="pi_1", customer="cus_1", latest_charge="ch_2",
                      status="succeeded", last_payment_error=None)
    row = extract(declined).rows[0].values
    assert (row["charge_id"], row["decline_code"]) == ("ch_1", "insufficient_funds")
    row = extract(authentication).rows[0].values
    assert (row["charge_id"], row["decline_code"], row["failure_code"]) == (
        None, None, "payment_intent_authentication_failure")
    assert row["charges"] == {}  # and it adds no charge to the card's count
    assert extract(succeeded).rows[0].values["charge_id"] == "ch_2"


def test_a_failed_bank_debit_is_about_the_charge_its_intent_names_last():
    """A SEPA / bank debit failure names its failed charge in the intent's latest_charge, not in
    last_payment_error.charge. Read as chargeless, the intent's event wiped its charge's codes
    (debit_not_authorized) or was wiped by them, by order."""
    debit = event("payment_intent.payment_failed", id="pi_1", customer="cus_1", latest_charge="py_1",
                  payment_method_types=["sepa_debit"], created=1_700_000_000,
                  paths={"last_payment_error.code": "", "last_payment_error.decline_code": "generic_decline"})
    row = extract(debit).rows[0].values
    assert (row["charge_id"], row["decline_code"]) == ("py_1", "generic_decline")
    assert list(row["charges"]) == ["py_1"]
    assert row["failed_at"] is None  # timed by its charge
    # an issuer's decline (it has a decline code) whose error names no charge: its latest charge too
    declined = event("payment_intent.payment_failed", id="pi_1", customer="cus_1", latest_charge="ch_2")
    assert declined["data"]["object"]["last_payment_error"]["decline_code"]  # the fixture's shape
    assert extract(declined).rows[0].values["charge_id"] == "ch_2"


def test_a_card_failure_whose_error_names_no_charge_made_none():
    """Stripe names the charge of a card error that made one. A retry on a reused intent refused
    before any charge (card_decline_rate_limit_exceeded) names none, and latest_charge is still the
    previous, already announced decline: this failure is its own, timed by its event."""
    refused = event("payment_intent.payment_failed", id="pi_1", customer="cus_1", latest_charge="ch_1",
                    created=1_700_000_000, paths={"last_payment_error.code": "card_decline_rate_limit_exceeded",
                                                  "last_payment_error.decline_code": None})
    row = extract(refused).rows[0].values
    assert (row["charge_id"], row["charges"], row["failure_code"]) == (None, {}, "card_decline_rate_limit_exceeded")
    assert row["failed_at"] is not None


def test_only_a_failure_that_made_no_charge_sets_its_failure_time():
    """failed_at times a failure no charge times (a failed 3-D Secure): set by its event, at the
    event's time; every other event about the attempt (a declined charge, its intent's event, the
    intent's cancellation, its success) leaves it (None, which the merge's GREATEST ignores)."""
    t = 1_700_000_000
    authentication = event("payment_intent.payment_failed", id="pi_1", customer="cus_1", latest_charge="ch_1",
                           created=t, paths={"last_payment_error.type": "invalid_request_error",
                                             "last_payment_error.code": "payment_intent_authentication_failure",
                                             "last_payment_error.decline_code": None})
    row = extract(authentication).rows[0]
    assert row.values["failed_at"] == datetime.fromtimestamp(t, UTC) and row.merge["failed_at"] == "greatest"
    others = [
        event("charge.failed", customer="cus_1", payment_intent="pi_1", created=t),
        event("payment_intent.payment_failed", id="pi_1", customer="cus_1", latest_charge="ch_1", created=t,
              paths={"last_payment_error.charge": "ch_1"}),
        event("payment_intent.payment_failed", id="pi_1", customer="cus_1", latest_charge=None, created=t,
              status="canceled"),
        event("payment_intent.payment_failed", id="pi_1", customer="cus_1", latest_charge="ch_2", created=t,
              status="succeeded", last_payment_error=None),
        event("invoice_payment.paid", created=t, paths={"payment.payment_intent": "pi_1"}),
    ]
    for evt in others:
        [row] = extract(evt).rows
        assert row.values["failed_at"] is None, evt["type"]


def test_an_error_code_that_is_no_string_is_no_crash():
    """A code that is a list (a shape Stripe never sends, as the property test above can draw it):
    mirrored or refused with a reason, never a TypeError."""
    odd = event("payment_intent.payment_failed", id="pi_1", customer="cus_1", latest_charge="ch_1",
                paths={"last_payment_error.code": []})
    try:
        extracted = extract(odd)
    except (NotAStripeEvent, OutOfRange):
        return
    assert extracted.event_id == str(odd["id"])


def test_an_invoice_line_keeps_the_subscription_item_it_bills():
    """Entitlements tell a plan swapped in on an item from an add-on beside it by the line's item."""
    evt = event("invoice.payment_failed", customer="cus_1")
    line = evt["data"]["object"]["lines"]["data"][0]
    item = line["parent"]["subscription_item_details"]["subscription_item"]
    [row] = extract(evt).rows
    assert item and [ln["item"] for ln in row.values["lines"]] == [item]
    older = copy.deepcopy(evt)  # API versions before 2025-03-31: the item on the line itself
    older_line = older["data"]["object"]["lines"]["data"][0]
    del older_line["parent"]
    older_line["subscription_item"] = "si_older"
    [older_row] = extract(older).rows
    assert [ln["item"] for ln in older_row.values["lines"]] == ["si_older"]


def test_a_subscription_event_keeps_its_word_on_the_pause_of_collection_at_its_second():
    """pause_collection.behavior by the event's second (None: collection not paused), merged with the
    other events' (webhooks/store.py "observations"), not replaced."""
    from tests.stripe_events import resource

    paused = event("customer.subscription.updated", created=1_700_000_000,
                   pause_collection=resource("subscription")["pause_collection"])
    (row,) = extract(paused).rows
    assert row.values["collection_paused"] == {"1700000000": "mark_uncollectible"}
    assert row.merge["collection_paused"] == "observations"
    (row,) = extract(event("customer.subscription.deleted", created=1_700_000_100)).rows
    assert row.values["collection_paused"] == {"1700000100": None}
