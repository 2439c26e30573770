"""Property: delivery order and duplicates of webhooks cannot change the final state, and a
recompute right after any recompute writes nothing and emits nothing.

Each generated history is delivered twice, to two accounts: once in order, once shuffled with
duplicates, through the real webhook endpoint and database, with a recompute after every
delivery. The stored states must be equal once the account-specific ids are normalised.
"""

from __future__ import annotations

import itertools
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.recompute.service import run_recompute
from tests.conftest import Accounts, post_event
from tests.stripe_events import event, unique, with_product

DECLINES = ["insufficient_funds", "expired_card", "incorrect_cvc", "do_not_honor", "a_code_from_the_future"]
OUTCOMES = ["open", "paid", "voided", "marked_uncollectible"]
BASE = int(time.time()) - 40 * 86400


@st.composite
def histories(draw: Any) -> list[tuple[str, dict[str, Any]]]:
    """Templates of (event type, parameters) in chronological order; ids get a per-account suffix."""
    steps: list[tuple[int, str, dict[str, Any]]] = []
    for n in range(draw(st.integers(1, 3))):
        t = BASE + draw(st.integers(0, 20)) * 86400
        upgrade = draw(st.booleans())
        product = "prod_premium_analytics" if upgrade else draw(st.sampled_from(["prod_core", "prod_premium"]))
        reason = "subscription_update" if upgrade else "subscription_cycle"
        inv = {"inv": f"in{n}", "product": product, "reason": reason}
        steps.append((t, "invoice.finalized", inv))
        for k in range(draw(st.integers(1, 3))):
            t += draw(st.integers(1, 4)) * 86400
            steps.append((t, "invoice.payment_failed", {**inv, "attempt_count": k + 1}))
            steps.append((t + 1, "charge.failed", {"charge": f"ch{n}_{k}", "pi": f"pi{n}_{k}",
                                                   "decline": draw(st.sampled_from(DECLINES))}))
        if draw(st.booleans()):
            t += draw(st.integers(1, 3)) * 86400
            steps.append((t, "payment_method.attached", {"pm": f"pm{n}"}))
        outcome = draw(st.sampled_from(OUTCOMES))
        if outcome != "open":
            t += draw(st.integers(1, 5)) * 86400
            steps.append((t, f"invoice.{outcome}", inv))
    steps.sort(key=lambda s: s[0])
    return [(kind, {**params, "t": t, "seq": i}) for i, (t, kind, params) in enumerate(steps)]


def render(kind: str, p: dict[str, Any], suffix: str, customer: str) -> dict[str, Any]:
    eid = f"evt{p['seq']}_{suffix}"
    if kind.startswith("invoice."):
        remaining = 0 if kind == "invoice.paid" else 5000
        evt = event(kind, event_id=eid, created=p["t"], id=f"{p['inv']}_{suffix}", customer=customer,
                    billing_reason=p["reason"], amount_due=5000, amount_remaining=remaining,
                    amount_paid=5000 - remaining, attempt_count=p.get("attempt_count", 0),
                    paths={"created": BASE - 86400})
        return with_product(evt, p["product"], 5000)
    if kind == "charge.failed":
        return event(kind, event_id=eid, created=p["t"], id=f"{p['charge']}_{suffix}", customer=customer,
                     payment_intent=f"{p['pi']}_{suffix}", failure_code="card_declined",
                     paths={"created": p["t"], "outcome.reason": p["decline"]})
    return event(kind, event_id=eid, created=p["t"], id=f"{p['pm']}_{suffix}", customer=customer)


STATE_SQL = """
SELECT d.status, d.level, d.failure_class, d.next_retry_at, d.retry_invoice_id, d.retry_payment_method_id,
       d.retry_free, d.retries_used, d.outstanding_amount, d.unpaid_since, d.last_failure_id, d.reasons,
       d.entitlements, d.actions_requested, a.bad_debt,
       (SELECT json_agg(m.* ORDER BY m.payment_method_id) FROM (
            SELECT payment_method_id, status, status_reason, is_default FROM subs_mandate
             WHERE account_id = a.account_id) m) AS mandates
  FROM subs_account a JOIN subs_dunning d USING (account_id) WHERE a.account_id = %(a)s
"""


def stored_state(engine: Any, account: str, suffix: str, customer: str) -> str:
    with engine.connect() as conn:
        row = conn.exec_driver_sql(STATE_SQL, {"a": account}).mappings().one()
    text = json.dumps(dict(row), default=str, sort_keys=True)
    return text.replace(suffix, "SUFFIX").replace(customer, "CUSTOMER").replace(account, "ACCOUNT")


def outbox_count(engine: Any, account: str) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT count(*) FROM outbox WHERE account_id = %(a)s",
                                        {"a": account}).scalar_one())


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(history=histories(), data=st.data())
def test_any_order_with_duplicates_ends_in_the_same_state(history, data, client, accounts: Accounts, runtime, engine):
    now = datetime.fromtimestamp(max(p["t"] for _, p in history), UTC) + timedelta(days=1)
    shuffled = data.draw(st.permutations(history))
    duplicates = data.draw(st.lists(st.sampled_from(history), max_size=4))
    deliveries = list(shuffled)
    for dup in duplicates:
        deliveries.insert(data.draw(st.integers(0, len(deliveries))), dup)

    finals = []
    for order in (history, deliveries):
        account, customer = accounts.create()
        suffix = unique("s")
        for kind, params in order:
            response = post_event(client, render(kind, params, suffix, customer))
            assert response.status_code == 200, response.json
            run_recompute(engine, runtime.policy, account, "STATE_REFRESH", now)
            # idempotence: a second recompute right away writes nothing and emits nothing
            emitted = outbox_count(engine, account)
            again = run_recompute(engine, runtime.policy, account, "STATE_REFRESH", now)
            assert again.outcome == "unchanged", again.applied
            assert outbox_count(engine, account) == emitted
        finals.append(stored_state(engine, account, suffix, customer))
    assert finals[0] == finals[1]


DAY = 86400


def attempt_codes(engine: Any, intent: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.exec_driver_sql(
            "SELECT charge_id, decline_code, failure_code, advice_code, charges FROM stripe_payment_attempt "
            "WHERE id = %(p)s", {"p": intent}).mappings().one())


def failure_class(engine: Any, account: str) -> str:
    with engine.connect() as conn:
        return str(conn.exec_driver_sql("SELECT failure_class FROM subs_dunning WHERE account_id = %(a)s",
                                        {"a": account}).scalar_one())


def failed_invoice(customer: str, t: int) -> dict[str, Any]:
    return with_product(event("invoice.payment_failed", id=unique("in"), customer=customer, created=t,
                              amount_due=5000, amount_remaining=5000, amount_paid=0, attempt_count=1,
                              billing_reason="subscription_cycle", paths={"created": t - DAY}), "prod_core", 5000)


def declined_charge(customer: str, intent: str, t: int, payment_method: str | None = None,
                    **outcome: Any) -> tuple[str, dict[str, Any]]:
    """A charge.failed of ``intent`` at ``t`` (card_declined), its outcome's fields in ``outcome``:
    (the charge id, the event)."""
    charge = unique("ch")
    method = {"payment_method": payment_method} if payment_method else {}
    return charge, event("charge.failed", id=charge, customer=customer, payment_intent=intent, amount=5000,
                         created=t, failure_code="card_declined", **method,
                         paths={"created": t, **{f"outcome.{k}": v for k, v in outcome.items()}})


def intent_failed(customer: str, intent: str, latest_charge: str, t: int, **error: Any) -> dict[str, Any]:
    """payment_intent.payment_failed of ``intent`` at ``t``, its last_payment_error's fields in ``error``."""
    return event("payment_intent.payment_failed", id=intent, customer=customer, latest_charge=latest_charge,
                 amount=5000,
                 created=t, paths={f"last_payment_error.{k}": v for k, v in error.items()})


def retried_invoice(invoice: dict[str, Any], t: int) -> dict[str, Any]:
    """Stripe's invoice.payment_failed of the invoice's second attempt, at ``t``."""
    retried = json.loads(json.dumps(invoice))
    retried.update(id=unique("evt"), created=t)
    retried["data"]["object"].update(attempt_count=2)
    return retried


def deliver_and_recompute_twice(client: Any, engine: Any, runtime: Any, account: str, evt: dict[str, Any],
                                now: datetime) -> None:
    """Post ``evt`` and recompute at ``now``; a second recompute right after writes and emits nothing."""
    assert post_event(client, evt).status_code == 200
    run_recompute(engine, runtime.policy, account, "STATE_REFRESH", now)
    emitted = outbox_count(engine, account)
    assert run_recompute(engine, runtime.policy, account, "STATE_REFRESH", now).outcome == "unchanged"
    assert outbox_count(engine, account) == emitted


def payment_failures(engine: Any, account: str) -> list[tuple[str, str]]:
    """The account's PaymentFailed events so far: (attempt, failure class)."""
    with engine.connect() as conn:
        return [(p["attempt_id"], p["failure_class"]) for (p,) in conn.exec_driver_sql(
            "SELECT payload FROM outbox WHERE account_id = %(a)s AND event_type = 'PaymentFailed' ORDER BY id",
            {"a": account})]


def deliver_in_every_order(client: Any, accounts: Accounts, engine: Any, runtime: Any, t: int, events: int,
                           history: Any) -> list[tuple[dict[str, Any], str]]:
    """``history(customer)`` -> (the invoice's event, the attempt's ``events`` events, the intent): the
    invoice first, then the attempt's events in every order, each order to an account of its own.
    Per order, the attempt's mirror row and the account's failure class after a recompute."""
    out = []
    for order in itertools.permutations(range(events)):
        account, customer = accounts.create()
        invoice, attempt_events, intent = history(customer)
        for evt in (invoice, *(attempt_events[i] for i in order)):
            assert post_event(client, evt).status_code == 200
        run_recompute(engine, runtime.policy, account, "STATE_REFRESH",
                      datetime.fromtimestamp(t, UTC) + timedelta(days=1))
        out.append((attempt_codes(engine, intent), failure_class(engine, account)))
    return out


def test_a_radar_block_told_by_its_charge_and_its_intent_in_one_second_ends_the_same(client, accounts, engine,
                                                                                     runtime):
    """Radar blocked the charge: its outcome.reason is Radar's (highest_risk_level), not a decline code;
    the intent's last_payment_error says fraudulent. Both events in the same second, either order."""
    t = int(time.time()) - 4 * DAY

    def history(customer: str) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
        intent = unique("pi")
        charge, blocked = declined_charge(customer, intent, t, type="blocked", reason="highest_risk_level")
        return failed_invoice(customer, t), [
            blocked, intent_failed(customer, intent, charge, t, decline_code="fraudulent", charge=charge)], intent

    for row, cls in deliver_in_every_order(client, accounts, engine, runtime, t, 2, history):
        assert (row["decline_code"], row["failure_code"], cls) == ("fraudulent", "card_declined", "permanent")


def test_one_charges_two_events_in_one_second_merge_the_same_in_either_order(client, accounts, engine, runtime):
    """The charge's event and its intent's, same second and status: where they both speak and disagree,
    the delivery order must not pick the stored code."""
    t = int(time.time()) - 4 * DAY

    def history(customer: str) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
        intent = unique("pi")
        charge, declined = declined_charge(customer, intent, t, type="issuer_declined", reason="do_not_honor",
                                           advice_code="try_again_later")
        return failed_invoice(customer, t), [
            declined, intent_failed(customer, intent, charge, t, decline_code="lost_card", code="expired_card",
                                    charge=charge)], intent

    results = deliver_in_every_order(client, accounts, engine, runtime, t, 2, history)
    rows = [({k: v for k, v in row.items() if k not in ("charge_id", "charges")}, cls) for row, cls in results]
    assert rows[0] == rows[1], rows


def test_a_failed_3ds_on_a_reused_intent_replaces_the_previous_charges_decline_in_any_order(client, accounts,
                                                                                            engine, runtime):
    """Attempt 1 on the intent: charge ch_1 declined insufficient_funds (its charge's event and its
    intent's). Attempt 2, days later on the same intent: 3-D Secure fails, no charge is made, and
    latest_charge still names ch_1. The newer attempt's outcome (the customer must act) is the row's,
    whatever the order; and the failed authentication adds no charge to the new card's count."""
    t1 = int(time.time()) - 5 * DAY
    t2 = t1 + 3 * DAY

    def history(customer: str) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
        intent = unique("pi")
        charge, declined = declined_charge(customer, intent, t1, "pm_old", type="issuer_declined",
                                           reason="insufficient_funds")
        return failed_invoice(customer, t1), [
            declined,
            intent_failed(customer, intent, charge, t1, charge=charge, payment_method={"id": "pm_old"}),
            intent_failed(customer, intent, charge, t2, type="invalid_request_error",
                          code="payment_intent_authentication_failure", decline_code=None,
                          payment_method={"id": "pm_new"})], intent

    for row, cls in deliver_in_every_order(client, accounts, engine, runtime, t2, 3, history):
        assert (row["decline_code"], row["failure_code"], row["advice_code"], cls) == (
            None, "payment_intent_authentication_failure", None, "action_required")
        assert [c["pm"] for c in row["charges"].values()] == ["pm_old"]


def test_a_bank_debit_failure_told_by_its_charge_and_its_intent_in_one_second_ends_the_same(client, accounts,
                                                                                          engine, runtime):
    """A SEPA debit failed: its charge's event says debit_not_authorized; its intent's names the charge
    in latest_charge only (no last_payment_error.charge, which only a card decline carries). Both
    are about that one charge, in either order: neither wipes the other's codes."""
    t = int(time.time()) - 4 * DAY

    def history(customer: str) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
        intent, charge = unique("pi"), unique("py")
        debit = event("charge.failed", id=charge, customer=customer, payment_intent=intent, amount=5000, created=t,
                      failure_code="debit_not_authorized", paths={"created": t})
        return failed_invoice(customer, t), [
            debit, intent_failed(customer, intent, charge, t, code="", decline_code="generic_decline",
                                 payment_method={"id": unique("pm"), "type": "sepa_debit"})], intent

    results = deliver_in_every_order(client, accounts, engine, runtime, t, 2, history)
    for row, cls in results:
        assert row["charge_id"] is not None and row["failure_code"] == "debit_not_authorized", row
        assert list(row["charges"]) == [row["charge_id"]]
        assert cls == "permanent"  # the mandate is revoked: no retry on it, whatever the intent's generic word
    assert [({k: v for k, v in row.items() if k not in ("charge_id", "charges")}, cls) for row, cls in results] \
        == [({k: v for k, v in results[0][0].items() if k not in ("charge_id", "charges")}, results[0][1])] * 2


@pytest.mark.parametrize("error_names_its_charge", [True, False], ids=["charge_named", "fixture_shape"])
def test_each_failed_retry_on_a_reused_intent_is_announced_once_whichever_of_its_events_comes_first(
        client, accounts, engine, runtime, error_names_its_charge):
    """Stripe retries the invoice on its payment intent: two failures, two charges, one attempt row.
    Each failure is told by its charge's event (the charge's exact time) and its intent's (the event's
    time, seconds later), in either order. Recomputed after every delivery: one PaymentFailed per
    failure, each with its own class, and a recompute right after writes and emits nothing. Also
    where the intent's error does not name its charge (the fixture's shape: an issuer's decline,
    decline_code and no charge): its latest charge is the declined one."""
    t1 = int(time.time()) - 5 * DAY
    t2 = t1 + 2 * DAY

    def failure(customer: str, intent: str, t: int, decline: str) -> list[dict[str, Any]]:
        charge, declined = declined_charge(customer, intent, t, type="issuer_declined", reason=decline)
        named = {"charge": charge} if error_names_its_charge else {}
        return [declined, intent_failed(customer, intent, charge, t + 2, decline_code=decline, **named)]

    for first_order, second_order in itertools.product([(0, 1), (1, 0)], repeat=2):
        account, customer = accounts.create()
        intent = unique("pi")
        invoice = failed_invoice(customer, t1)
        retried = retried_invoice(invoice, t2)
        one = failure(customer, intent, t1, "insufficient_funds")
        two = failure(customer, intent, t2, "expired_card")
        deliveries = [invoice, *(one[i] for i in first_order), retried, *(two[i] for i in second_order)]
        for n, evt in enumerate(deliveries):
            deliver_and_recompute_twice(client, engine, runtime, account, evt,
                                        datetime.fromtimestamp(evt["created"], UTC) + timedelta(minutes=n))
        failed = payment_failures(engine, account)
        assert failed == [(intent, "transient"), (intent, "permanent")], (first_order, second_order, failed)


def test_a_failed_3ds_retry_on_a_reused_intent_is_announced_once_in_any_order(client, accounts, engine, runtime):
    """Attempt 1 on the intent: ch_1 declined (its charge's event and its intent's, either order).
    Attempt 2 on the same intent, days later: 3-D Secure fails, no charge; latest_charge still names
    ch_1, so the intent's charges end with ch_1. Recomputed after every delivery: each failure is
    announced once, with its own class (the 3-D Secure failure is timed by its event, not by ch_1).
    Delivered newest first, the older failure is not announced after the newer one, and the final
    state is the same."""
    t1 = int(time.time()) - 5 * DAY
    t2 = t1 + 2 * DAY

    def history(customer: str, intent: str) -> list[dict[str, Any]]:
        invoice = failed_invoice(customer, t1)
        retried = retried_invoice(invoice, t2)
        charge, declined = declined_charge(customer, intent, t1, type="issuer_declined", reason="insufficient_funds")
        return [invoice, declined, intent_failed(customer, intent, charge, t1 + 2, charge=charge), retried,
                intent_failed(customer, intent, charge, t2, type="invalid_request_error",
                              code="payment_intent_authentication_failure", decline_code=None)]

    finals = []
    for order in ((0, 1, 2, 3, 4), (0, 2, 1, 3, 4), (3, 4, 0, 2, 1)):
        account, customer = accounts.create()
        intent = unique("pi")
        events = history(customer, intent)
        for n, i in enumerate(order):
            deliver_and_recompute_twice(client, engine, runtime, account, events[i],
                                        datetime.fromtimestamp(t2, UTC) + timedelta(minutes=n))
        failed = payment_failures(engine, account)
        with engine.connect() as conn:
            failed_at = conn.exec_driver_sql("SELECT failed_at FROM stripe_payment_attempt WHERE id = %(p)s",
                                             {"p": intent}).scalar_one()
        expected = [(intent, "action_required")] if order[0] == 3 else [(intent, "transient"),
                                                                        (intent, "action_required")]
        assert failed == expected, (order, failed)
        assert failed_at == datetime.fromtimestamp(t2, UTC)
        finals.append(stored_state(engine, account, intent, customer).replace(events[0]["data"]["object"]["id"],
                                                                              "INVOICE"))
    assert finals[0] == finals[1] == finals[2]


def test_a_retry_refused_before_any_charge_on_a_reused_intent_is_a_failure_of_its_own(client, accounts, engine,
                                                                                      runtime):
    """Attempt 1 on the intent: its charge declined (do_not_honor). Stripe retries the invoice on the
    same intent two days later and refuses it before any charge (card_decline_rate_limit_exceeded:
    its error names no charge, latest_charge is still the first one): a second failed payment,
    announced, with its own codes, not folded into the first charge's."""
    t1 = int(time.time()) - 5 * DAY
    t2 = t1 + 2 * DAY
    account, customer = accounts.create()
    intent = unique("pi")
    invoice = failed_invoice(customer, t1)
    retried = retried_invoice(invoice, t2)
    charge, declined = declined_charge(customer, intent, t1, type="issuer_declined", reason="do_not_honor")
    events = [invoice, declined, intent_failed(customer, intent, charge, t1 + 2, charge=charge,
                                               decline_code="do_not_honor"),
              retried, intent_failed(customer, intent, charge, t2, type="card_error",
                                     code="card_decline_rate_limit_exceeded", decline_code=None)]
    for n, evt in enumerate(events):
        assert post_event(client, evt).status_code == 200
        run_recompute(engine, runtime.policy, account, "STATE_REFRESH",
                      datetime.fromtimestamp(t2, UTC) + timedelta(minutes=n))
    row = attempt_codes(engine, intent)
    assert (row["charge_id"], row["decline_code"], row["failure_code"]) == (
        None, None, "card_decline_rate_limit_exceeded")
    assert [attempt for attempt, _ in payment_failures(engine, account)] == [intent, intent]
