"""The scenarios of the source documents (../shared/seeds/), each through the real components: Stripe's
signed webhooks (tests/stripe_events.py) into the Flask app, a real recompute at the moment the story
says (freezegun for the clock), the outbox relayed to the fake Account Management.

000: the seed about the retry loop, its failures ("~10,800 accounts per year incorrectly in bad debt
from upgrades", blunt consequences, entitlements disconnected, no failure distinction) and the fixes.
002: the seed about the recompute engine (one engine for every event; what each Stripe event makes it
do; "days -> minutes" resolution).
"""

from __future__ import annotations

import copy
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from freezegun import freeze_time

from app.outbox.relay import relay
from app.payments.retries import claim_due
from app.recompute.service import run_recompute
from tests.conftest import Accounts, post_event, wait_for
from tests.fakes import fake_stripe as outcomes
from tests.integration.bad_debt_setup import dunning_row
from tests.integration.dunning_setup import retries
from tests.integration.journey_views import dunning, labels, outbox
from tests.stripe_events import event, unique, with_product

DAY = 86400


def invoice_event(kind: str, customer: str, invoice: str, at: int, *, subscription: str, created: int,
                  products: tuple[str, ...] = ("prod_core",), amount: int = 5000, paid: int = 0,
                  attempts: int = 1, reason: str = "subscription_cycle") -> dict[str, Any]:
    """Stripe's ``kind`` event of ``invoice`` of ``subscription``, one line per product (the fixture's
    own line item, copied), the amount split between them."""
    status = {"invoice.paid": "paid", "invoice.payment_succeeded": "paid", "invoice.marked_uncollectible":
              "uncollectible", "invoice.voided": "void"}.get(kind, "open")
    evt = event(kind, id=invoice, customer=customer, created=at, attempt_count=attempts, billing_reason=reason,
                amount_due=amount, amount_paid=paid, amount_remaining=amount - paid, status=status,
                paths={"created": created, "parent.subscription_details.subscription": subscription})
    share = amount // len(products)
    with_product(evt, products[0], amount - share * (len(products) - 1))
    lines = evt["data"]["object"]["lines"]["data"]
    for product in products[1:]:
        line = copy.deepcopy(lines[0])
        line["id"] = unique("il")
        lines.append(line)
        line["pricing"] = {"type": "price_details", "unit_amount_decimal": None,
                           "price_details": {"price": f"price_{product}", "product": product}}
        line["amount"] = share
    return evt


def charge_failed(customer: str, at: int, decline: str, pm: str = "card_old") -> dict[str, Any]:
    return event("charge.failed", id=unique("ch"), customer=customer, payment_intent=unique("pi"),
                 payment_method=pm, failure_code="card_declined", created=at,
                 paths={"created": at, "outcome.reason": decline})


def recompute(engine, runtime, account: str, at: datetime, trigger: str = "MANUAL") -> dict[str, Any]:
    """A full recompute at ``at`` (the clock frozen there too), the stored row after it."""
    with freeze_time(at):
        run_recompute(engine, runtime.policy, account, trigger, at)
    return dunning_row(engine, account)


def relayed(engine, fake_am, account: str, at: datetime) -> list[Any]:
    """One relay pass at ``at`` (every backoff passed); what Account Management took of the account."""
    with freeze_time(at):
        relay(engine, fake_am.url, now=at)
    return fake_am.for_account(account)


def payloads(engine, account: str, event_type: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [r[0] for r in conn.exec_driver_sql(
            "SELECT payload FROM outbox WHERE account_id = %(a)s AND event_type = %(t)s ORDER BY id",
            {"a": account, "t": event_type})]


def account_flag(engine, account: str) -> bool:
    with engine.connect() as conn:
        return bool(conn.exec_driver_sql("SELECT bad_debt FROM subs_account WHERE account_id = %(a)s",
                                         {"a": account}).scalar_one())


def test_an_expired_card_last_week_and_six_months_unpaid_never_get_the_same_treatment(
        client, accounts: Accounts, engine, runtime, fake_am):
    """Seed 000, "Blunt Consequences": "A customer whose card expired last week and one who hasn't paid
    in six months receive the same treatment." And "Graduated Consequences": "Early failures may
    restrict premium features while preserving core access"; "Disconnected from Entitlements": what
    dunning decides reaches Account Management as entitlements. Both customers hold core and premium
    on the unpaid invoice."""
    now = datetime.now(UTC).replace(microsecond=0)
    ts = int(now.timestamp())
    card, card_sub = accounts.create(), unique("sub")
    months, months_sub = accounts.create(), unique("sub")
    both = ("prod_core", "prod_premium")

    expired = unique("in")
    post_event(client, invoice_event("invoice.payment_failed", card[1], expired, ts - 7 * DAY,
                                     subscription=card_sub, created=ts - 7 * DAY - 3600, products=both))
    post_event(client, charge_failed(card[1], ts - 7 * DAY + 1, "expired_card"))

    old = unique("in")
    t0 = ts - 182 * DAY
    post_event(client, invoice_event("invoice.payment_failed", months[1], old, t0, subscription=months_sub,
                                     created=t0 - 3600, products=both))
    post_event(client, charge_failed(months[1], t0 + 1, "insufficient_funds"))
    # Its retries over the following two weeks all declined: Stripe's attempt count says seven tries.
    post_event(client, invoice_event("invoice.payment_failed", months[1], old, t0 + 14 * DAY, subscription=months_sub,
                                     created=t0 - 3600, products=both, attempts=7))
    post_event(client, charge_failed(months[1], t0 + 14 * DAY + 1, "insufficient_funds"))

    last_week = recompute(engine, runtime, card[0], now)
    six_months = recompute(engine, runtime, months[0], now)

    assert (last_week["status"], last_week["level"], last_week["failure_class"]) == \
        ("past_due", "restrict_premium", "permanent"), last_week
    assert last_week["next_retry_at"] is None  # the same card is not tried again: the customer must act
    assert last_week["entitlements"]["products"] == {"prod_core": "full", "prod_premium": "revoked"}
    assert not account_flag(engine, card[0])
    assert (six_months["status"], six_months["level"]) == ("bad_debt", "suspended"), six_months
    assert six_months["entitlements"]["products"] == {"prod_core": "revoked", "prod_premium": "revoked"}
    assert account_flag(engine, months[0])

    told_card = relayed(engine, fake_am, card[0], now + timedelta(hours=1))
    told_months = fake_am.for_account(months[0])
    assert [(r.kind, r.body["entitlements"]["products"]) for r in told_card] == \
        [("entitlements", {"prod_core": "full", "prod_premium": "revoked"})]
    assert [r.kind for r in told_months] == ["entitlements", "cancellations"], told_months
    assert told_months[0].body["entitlements"]["products"] == {"prod_core": "revoked", "prod_premium": "revoked"}
    assert told_months[1].body["subscription_id"] == months_sub
    assert "BadDebtEntered" not in outbox(engine, card[0]) and "CancellationRequested" not in outbox(engine, card[0])


def test_invoice_payment_succeeded_clears_the_dunning_its_retry_counters_and_the_bad_debt_flag(
        client, accounts: Accounts, engine, runtime, fake_am):
    """Seed 002, invoice.payment_succeeded: "Payment confirmed. Engine clears dunning state, resets retry
    counters, and removes any bad_debt flags." The customer pays the invoice that went to bad debt
    (its six retries declined, then marked uncollectible) on Stripe's hosted page; next month's invoice
    then fails once: a new dunning at its start, not the old one's counters or its bad debt."""
    account, customer = accounts.create()
    sub, invoice = unique("sub"), unique("in")
    now = datetime.now(UTC).replace(microsecond=0)
    t0 = int(now.timestamp()) - 40 * DAY
    post_event(client, invoice_event("invoice.payment_failed", customer, invoice, t0, subscription=sub,
                                     created=t0 - 3600))
    post_event(client, charge_failed(customer, t0 + 1, "insufficient_funds"))
    post_event(client, invoice_event("invoice.payment_failed", customer, invoice, t0 + 14 * DAY, subscription=sub,
                                     created=t0 - 3600, attempts=7))
    post_event(client, charge_failed(customer, t0 + 14 * DAY + 1, "insufficient_funds"))
    at = datetime.fromtimestamp(t0 + 15 * DAY, UTC)
    assert recompute(engine, runtime, account, at)["retries_used"] == 6
    post_event(client, invoice_event("invoice.marked_uncollectible", customer, invoice, t0 + 30 * DAY,
                                     subscription=sub, created=t0 - 3600, attempts=7))
    state = recompute(engine, runtime, account, at + timedelta(days=15))
    assert state["status"] == "bad_debt" and account_flag(engine, account)

    paid_at = t0 + 35 * DAY
    post_event(client, invoice_event("invoice.payment_succeeded", customer, invoice, paid_at, subscription=sub,
                                     created=t0 - 3600, attempts=8, paid=5000))
    state = recompute(engine, runtime, account, datetime.fromtimestamp(paid_at + 60, UTC))
    assert (state["status"], state["level"], state["retries_used"], state["next_retry_at"]) == \
        ("current", "none", 0, None), state
    assert state["outstanding_amount"] == 0 and not account_flag(engine, account)
    assert [p["how"] for p in payloads(engine, account, "BadDebtExited")] == ["paid"]
    assert labels(client, account) == {invoice: "Paid"}
    told = relayed(engine, fake_am, account, datetime.fromtimestamp(paid_at + 120, UTC))
    assert told[-1].kind == "entitlements" and told[-1].body["entitlements"]["products"] == {"prod_core": "full"}

    nxt = unique("in")
    t1 = t0 + 38 * DAY
    post_event(client, invoice_event("invoice.payment_failed", customer, nxt, t1, subscription=sub, created=t1 - 3600))
    post_event(client, charge_failed(customer, t1 + 1, "insufficient_funds"))
    state = recompute(engine, runtime, account, datetime.fromtimestamp(t1 + 3600, UTC))
    assert (state["status"], state["level"], state["retries_used"]) == ("past_due", "notice", 0), state
    assert state["next_retry_at"] == datetime.fromtimestamp(t1, UTC) + timedelta(days=1)
    assert not account_flag(engine, account)
    assert outbox(engine, account).count("BadDebtEntered") == 1


def test_an_invoice_finalized_during_a_dunning_is_no_debt_until_its_own_payment_fails(
        client, accounts: Accounts, engine, runtime):
    """Seed 002, invoice.finalized: "Invoice ready for collection. Engine checks if the account is already
    in dunning and adjusts state accordingly." Next month's invoice is finalized while last month's is
    8 days past due: the dunning stays that of the unpaid one (level, retry, amount owed) until the new
    one's own payment fails, which starts its own schedule and adds it to what is owed."""
    account, customer = accounts.create()
    sub, first, second = unique("sub"), unique("in"), unique("in")
    now = datetime.now(UTC).replace(microsecond=0)
    t0 = int(now.timestamp()) - 8 * DAY
    post_event(client, invoice_event("invoice.payment_failed", customer, first, t0, subscription=sub,
                                     created=t0 - 3600))
    post_event(client, charge_failed(customer, t0 + 1, "insufficient_funds"))
    before = recompute(engine, runtime, account, now - timedelta(hours=2))
    assert (before["status"], before["level"]) == ("past_due", "restrict_premium"), before

    post_event(client, invoice_event("invoice.finalized", customer, second, int(now.timestamp()) - 3600,
                                     subscription=sub, created=int(now.timestamp()) - 3700))
    after = recompute(engine, runtime, account, now - timedelta(hours=1))
    for column in ("status", "level", "next_retry_at", "retry_invoice_id", "outstanding_amount", "unpaid_since",
                   "entitlements", "version"):
        assert after[column] == before[column], column
    assert labels(client, account) == {first: "Past due", second: "Open"}

    failed_at = int(now.timestamp()) - 600
    post_event(client, invoice_event("invoice.payment_failed", customer, second, failed_at, subscription=sub,
                                     created=int(now.timestamp()) - 3700))
    post_event(client, charge_failed(customer, failed_at + 1, "insufficient_funds"))
    state = recompute(engine, runtime, account, now)
    assert state["outstanding_amount"] == 10000 and state["level"] == "restrict_premium", state
    assert state["unpaid_since"] == before["unpaid_since"]
    assert labels(client, account) == {first: "Past due", second: "Past due"}
    assert any(r["rule"] == "retry.scheduled" and r["facts"]["invoice"] == second
               and r["facts"]["counted_from"] == datetime.fromtimestamp(failed_at, UTC).isoformat()
               for r in state["reasons"]), state["reasons"]


def test_a_subscription_canceled_mid_dunning_grants_nothing_and_is_never_cancelled_again(
        client, accounts: Accounts, engine, runtime, fake_am):
    """Seed 002, customer.subscription.updated: "Engine re-evaluates whether dunning state is still
    consistent with current subscriptions"; seed 000, "Cancel What Should Be Cancelled". The customer
    cancels the subscription at once while its invoice is 4 days unpaid: what it granted is gone (not
    the full access of notice), the money is still owed, and when the invoice goes to bad debt there is
    no subscription left for the lifecycle workflow to cancel."""
    account, customer = accounts.create()
    sub, invoice = unique("sub"), unique("in")
    now = datetime.now(UTC).replace(microsecond=0)
    t0 = int(now.timestamp()) - 30 * DAY
    post_event(client, invoice_event("invoice.payment_failed", customer, invoice, t0, subscription=sub,
                                     created=t0 - 3600))
    post_event(client, charge_failed(customer, t0 + 1, "insufficient_funds"))
    post_event(client, event("customer.subscription.updated", id=sub, customer=customer, created=t0 + 2 * DAY,
                             status="active", paths={"items.data.0.price.product": "prod_core"}))
    state = recompute(engine, runtime, account, datetime.fromtimestamp(t0 + 3 * DAY, UTC))
    assert (state["level"], state["entitlements"]["products"]) == ("notice", {"prod_core": "full"}), state

    post_event(client, event("customer.subscription.updated", id=sub, customer=customer, created=t0 + 4 * DAY,
                             status="canceled", paths={"items.data.0.price.product": "prod_core"}))
    state = recompute(engine, runtime, account, datetime.fromtimestamp(t0 + 4 * DAY + 60, UTC))
    assert state["status"] == "past_due" and state["outstanding_amount"] == 5000, state
    assert state["entitlements"]["products"] == {"prod_core": "revoked"}

    post_event(client, invoice_event("invoice.marked_uncollectible", customer, invoice, t0 + 25 * DAY,
                                     subscription=sub, created=t0 - 3600))
    state = recompute(engine, runtime, account, now)
    assert state["status"] == "bad_debt" and account_flag(engine, account)
    assert state["actions_requested"] == []
    assert "CancellationRequested" not in outbox(engine, account)
    told = relayed(engine, fake_am, account, now + timedelta(hours=1))
    assert [r.kind for r in told] == ["entitlements"], told  # the latest only: the older are stale
    assert told[0].body["entitlements"]["products"] == {"prod_core": "revoked"}


def test_a_refund_of_a_paid_invoice_is_recomputed_into_the_history_and_owes_nothing(
        client, accounts: Accounts, engine, runtime):
    """Seed 002, charge.refunded: "Refund processed. Engine recalculates account standing based on the
    updated payment history." The merchant refunds a paid invoice in full: the money went back, so the
    history no longer says Paid (DESIGN 4: Resolved), and a refund is no debt of the customer."""
    account, customer = accounts.create()
    sub, invoice, intent = unique("sub"), unique("in"), unique("pi")
    now = datetime.now(UTC).replace(microsecond=0)
    ts = int(now.timestamp()) - 5 * DAY
    post_event(client, invoice_event("invoice.paid", customer, invoice, ts, subscription=sub, created=ts - 3600,
                                     paid=5000))
    post_event(client, event("invoice_payment.paid", id=unique("inpay"), invoice=invoice, amount_paid=5000,
                             amount_requested=5000, created=ts, paths={"payment.payment_intent": intent}))
    state = recompute(engine, runtime, account, now - timedelta(days=1))
    assert state["status"] == "current" and labels(client, account) == {invoice: "Paid"}

    post_event(client, event("charge.refunded", id=unique("ch"), customer=customer, payment_intent=intent,
                             amount=5000, amount_refunded=5000, refunded=True, created=ts + DAY,
                             paths={"created": ts + DAY}))
    state = recompute(engine, runtime, account, now)
    assert (state["status"], state["level"], state["outstanding_amount"]) == ("current", "none", 0), state
    assert labels(client, account) == {invoice: "Resolved"}
    assert "DunningEntered" not in outbox(engine, account)


def test_in_bad_debt_a_new_card_starts_no_regular_retry_only_the_bad_debt_payment_collects(
        client, engine, runtime, debtor, stripe_fake):
    """Seed 000, "Isolate Bad Debt Payment": "Own endpoint (/pay-bad-debt) with guards. Separate from the
    regular collection path. No cross-contamination." The customer in bad debt adds a card: the regular
    path plans and claims no retry of the uncollectible invoice (beat finds nothing due), and the debt
    is collected through /pay-bad-debt."""
    from tests.integration.bad_debt_setup import key, pay

    now = datetime.now(UTC).replace(microsecond=0)
    card = unique("pm")
    post_event(client, event("payment_method.attached", id=card, customer=debtor.customer,
                             created=int(now.timestamp()) - 60))
    post_event(client, event("customer.updated", id=debtor.customer, created=int(now.timestamp()) - 59,
                             paths={"invoice_settings.default_payment_method": card}))
    state = recompute(engine, runtime, debtor.account, now)
    assert state["status"] == "bad_debt" and state["next_retry_at"] is None, state
    with freeze_time(now + timedelta(days=30)):
        claim_due(engine, now + timedelta(days=30))  # beat, a month on
    assert retries(engine, debtor.account) == []
    assert stripe_fake.invoice_payments() == []

    answer = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert answer.status_code == 202, answer.json
    assert recompute(engine, runtime, debtor.account, datetime.now(UTC))["status"] == "lifting"


def test_an_account_the_old_upgrade_handler_put_in_bad_debt_is_cleared_by_its_next_event(
        client, accounts: Accounts, engine, worker):
    """Seed 000: "~10,800 accounts per year incorrectly in bad debt from upgrades"; seed 002: resolution
    "Days -- manual investigation" -> "Minutes -- next event triggers full recompute", and A3 writes the
    bad_debt flag of subs_account. An account whose base plan is paid and whose upgrade proration is
    unpaid carries subs_account.bad_debt = true from the blind handlers; the next webhook of any kind
    about it (here the customer's default card changing) recomputes it whole: not bad debt, the
    upgrade withheld only, nothing cancelled."""
    account, customer = accounts.create()
    sub, base, upgrade = unique("sub"), unique("in"), unique("in")
    t0 = int(time.time()) - 40 * DAY
    post_event(client, invoice_event("invoice.paid", customer, base, t0, subscription=sub, created=t0 - 3600,
                                     paid=5000))
    post_event(client, invoice_event("invoice.payment_failed", customer, upgrade, t0 + DAY, subscription=sub,
                                     created=t0 + DAY - 3600, products=("prod_premium_analytics",), amount=2500,
                                     reason="subscription_update"))
    post_event(client, charge_failed(customer, t0 + DAY + 1, "insufficient_funds"))
    wait_for(lambda: dunning_row(engine, account).get("status") == "past_due", message="upgrade unpaid")
    # What the blind per-event handler wrote before this product owned the flag.
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE subs_account SET bad_debt = true WHERE account_id = %(a)s", {"a": account})

    post_event(client, event("customer.updated", id=customer, created=int(time.time()),
                             paths={"invoice_settings.default_payment_method": unique("pm")}))
    wait_for(lambda: not account_flag(engine, account), message="the flag cleared by the next event")
    state = dunning(client, account)
    assert state["status"] == "past_due" and state["bad_debt"] is False, state
    assert state["entitlements"]["products"]["prod_premium_analytics"] == "withheld"
    assert state["entitlements"]["products"].get("prod_core", "full") == "full"
    events = outbox(engine, account)
    assert "BadDebtEntered" not in events and "CancellationRequested" not in events, events


@pytest.mark.worker
def test_a_dunning_whose_retries_all_decline_is_cancelled_on_day_21_not_left_in_limbo(
        client, accounts: Accounts, engine, runtime, worker, celery_app, fake_stripe, fake_am):
    """Seed 000: "When retries are exhausted, dunning escalates to account-level consequences" and
    "Cancel What Should Be Cancelled: Delegate to existing subscription lifecycle workflow. Accounts
    that exhausted dunning get cancelled, not left in limbo." insufficient_funds: the six retries of
    the schedule (days 1, 3, 5, 7, 10, 14) are charged by beat and all decline; limited until day 21,
    then bad debt (retries_exhausted), the products revoked and the subscription's cancellation sent to
    Account Management, once."""
    account, customer = accounts.create()
    sub, invoice, card = unique("sub"), unique("in"), unique("pm")
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=23)
    ts = int(t0.timestamp())

    def failed(at: int, attempts: int) -> dict[str, Any]:
        return invoice_event("invoice.payment_failed", customer, invoice, at, subscription=sub, created=ts - 3600,
                             attempts=attempts)

    with freeze_time(t0, tick=True):
        post_event(client, event("customer.updated", id=customer, created=ts - DAY,
                                 paths={"invoice_settings.default_payment_method": card}))
        post_event(client, failed(ts, 1))
        post_event(client, charge_failed(customer, ts + 1, "insufficient_funds", card))
        wait_for(lambda: dunning(client, account)["failure_class"] == "transient", message="first failure")

    fake_stripe.default = outcomes.decline("insufficient_funds")
    for n, day in enumerate((1, 3, 5, 7, 10, 14), start=1):
        at = t0 + timedelta(days=day, minutes=10 * n)
        with freeze_time(at, tick=True):
            assert dunning(client, account)["next_retry_at"] is not None, n
            celery_app.send_task("tasks.dispatch_due_retries")
            def charged(n: int = n) -> bool:
                return len(fake_stripe.pay_requests(invoice)) == n

            wait_for(charged, message=f"retry {n} charged")
            now = int(at.timestamp())
            post_event(client, failed(now + 2, 1))
            post_event(client, charge_failed(customer, now + 1, "insufficient_funds", card))
            def declined(n: int = n) -> bool:
                return bool(dunning(client, account)["retries_used"] == n)

            wait_for(declined, message=f"retry {n} declined")

    state = recompute(engine, runtime, account, t0 + timedelta(days=20, hours=23))
    assert (state["status"], state["level"], state["next_retry_at"]) == ("past_due", "limited", None), state
    assert any(r["rule"] == "retry.schedule_done" for r in state["reasons"])
    assert "CancellationRequested" not in outbox(engine, account)

    day21 = t0 + timedelta(days=21, minutes=1)
    state = recompute(engine, runtime, account, day21)
    assert (state["status"], state["level"]) == ("bad_debt", "suspended"), state
    assert account_flag(engine, account)
    assert [p["reason"] for p in payloads(engine, account, "BadDebtEntered")] == ["retries_exhausted"]
    told = relayed(engine, fake_am, account, day21 + timedelta(minutes=5))
    cancellations = [r for r in told if r.kind == "cancellations"]
    assert [(c.body["subscription_id"], c.body["reason"], c.body["action"]) for c in cancellations] == \
        [(sub, "retries_exhausted", "cancel")]
    assert told[-2].kind == "entitlements" and told[-2].body["entitlements"]["products"] == {"prod_core": "revoked"}
    assert len(fake_stripe.pay_requests(invoice)) == 6

    # Nothing more to do on the next days: no second cancellation, no retry, still owed.
    later = recompute(engine, runtime, account, day21 + timedelta(days=1))
    assert later["version"] == state["version"]
    assert [r.kind for r in relayed(engine, fake_am, account, day21 + timedelta(days=1, minutes=5))
            ].count("cancellations") == 1


def test_a_bad_debt_paid_through_its_own_endpoint_shows_paid_in_the_billing_history(
        client, engine, runtime, debtor, stripe_fake, fake_am):
    """Seed 000, "Fix Billing History: Show 'Resolved' vs 'Paid' correctly. Customers and support can
    see what actually happened" and "Isolate Bad Debt Payment". The customer pays the bad debt through
    /pay-bad-debt: its own intent is charged, the settlement pays the invoice out of band at Stripe
    (Stripe's invoice.paid then counts that in amount_paid) and the history says Paid, the customer's
    money, not Resolved; the bad debt ended paid and Account Management gives the product back."""
    from app.payments.bad_debt_settle import settle
    from tests.integration.bad_debt_setup import intent_event, key, pay

    answer = pay(client, {"account_id": debtor.account, "amount": debtor.amount}, key())
    assert answer.status_code == 202, answer.json
    assert recompute(engine, runtime, debtor.account, datetime.now(UTC))["status"] == "lifting"
    succeeded = intent_event("succeeded", debtor, answer.json["stripe_payment_intent_id"], answer.json["payment_id"])
    assert post_event(client, succeeded).status_code == 200
    assert settle(runtime, int(answer.json["payment_id"])).outcome == "settled"
    [paid_out_of_band] = stripe_fake.invoice_payments()
    assert paid_out_of_band.params["paid_out_of_band"] == "true"

    now = datetime.now(UTC).replace(microsecond=0)
    paid = with_product(event("invoice.paid", id=debtor.invoice, customer=debtor.customer,
                              created=int(now.timestamp()), amount_due=debtor.amount, amount_paid=debtor.amount,
                              amount_remaining=0, total=debtor.amount, status="paid",
                              paths={"created": debtor.invoice_object["created"]}), "prod_premium", debtor.amount)
    assert post_event(client, paid).status_code == 200
    state = recompute(engine, runtime, debtor.account, now + timedelta(minutes=1))
    assert (state["status"], state["level"]) == ("current", "none"), state
    assert labels(client, debtor.account) == {debtor.invoice: "Paid"}
    assert [p["how"] for p in payloads(engine, debtor.account, "BadDebtExited")] == ["paid"]
    assert [p["how"] for p in payloads(engine, debtor.account, "DunningResolved")] == ["paid"]
    told = relayed(engine, fake_am, debtor.account, now + timedelta(minutes=5))
    assert told[-1].kind == "entitlements" and told[-1].body["entitlements"]["products"] == {"prod_premium": "full"}


def test_bad_debt_of_the_monthly_plan_leaves_the_paid_annual_product_and_its_subscription_alone(
        client, accounts: Accounts, engine, runtime, fake_am):
    """Seed 000, "Blunt Consequences" (bad_debt flag or not, ban or not) and "Graduated Consequences"
    (consequences scale, not the whole account); DESIGN 4: consequences act on the unpaid invoices'
    products, an annual product already paid stays untouched. The monthly core plan goes to bad debt;
    the annual premium add-on, paid, on its own subscription, keeps full access and is not cancelled."""
    account, customer = accounts.create()
    monthly, annual = unique("sub"), unique("sub")
    now = datetime.now(UTC).replace(microsecond=0)
    t0 = int(now.timestamp()) - 60 * DAY
    yearly = unique("in")
    post_event(client, invoice_event("invoice.paid", customer, yearly, t0 - 100 * DAY, subscription=annual,
                                     created=t0 - 100 * DAY - 3600, products=("prod_premium",), amount=60000,
                                     paid=60000))
    unpaid = unique("in")
    post_event(client, invoice_event("invoice.payment_failed", customer, unpaid, t0, subscription=monthly,
                                     created=t0 - 3600))
    post_event(client, charge_failed(customer, t0 + 1, "expired_card"))
    post_event(client, invoice_event("invoice.marked_uncollectible", customer, unpaid, t0 + 30 * DAY,
                                     subscription=monthly, created=t0 - 3600))
    state = recompute(engine, runtime, account, now)
    assert (state["status"], state["level"]) == ("bad_debt", "suspended"), state
    assert state["entitlements"]["products"] == {"prod_core": "revoked", "prod_premium": "full"}
    assert state["actions_requested"] == [f"cancel:{monthly}"]
    assert [p["products"] for p in payloads(engine, account, "BadDebtEntered")] == [["prod_core"]]

    told = relayed(engine, fake_am, account, now + timedelta(minutes=5))
    assert [(r.kind, r.body.get("subscription_id")) for r in told] == [("entitlements", None),
                                                                       ("cancellations", monthly)], told
    assert told[0].body["entitlements"]["products"] == {"prod_core": "revoked", "prod_premium": "full"}
    assert labels(client, account) == {yearly: "Paid", unpaid: "Uncollectible"}
