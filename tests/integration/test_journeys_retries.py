"""Journeys across days of dunning: time moved with freezegun, beat's due-retry task sent as beat
sends it, the real worker charging the fake Stripe, Stripe's webhooks for each outcome."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from freezegun import freeze_time

from tests.conftest import Accounts, post_event, wait_for
from tests.fakes import fake_stripe as outcomes
from tests.integration.dunning_setup import retries
from tests.integration.journey_views import dunning, labels, outbox, support_recompute
from tests.stripe_events import event, unique, with_product

pytestmark = pytest.mark.worker
DAY = 86400


def invoice_event(kind: str, customer: str, invoice: str, at: int, created: int, *, attempts: int = 1,
                  paid: bool = False) -> dict[str, Any]:
    evt = event(kind, id=invoice, customer=customer, created=at, attempt_count=attempts,
                billing_reason="subscription_cycle", amount_due=5000, amount_paid=5000 if paid else 0,
                amount_remaining=0 if paid else 5000, status="paid" if paid else "open",
                paths={"created": created})
    return with_product(evt, "prod_core", 5000)


def charge_failed(customer: str, at: int, decline: str, pm: str) -> dict[str, Any]:
    return event("charge.failed", id=unique("ch"), customer=customer, payment_intent=unique("pi"),
                 payment_method=pm, failure_code="card_declined", created=at,
                 paths={"created": at, "outcome.reason": decline})


def default_card(client, customer: str, card: str, at: int) -> None:
    post_event(client, event("customer.updated", id=customer, created=at,
                             paths={"invoice_settings.default_payment_method": card}))


def first_payment_failed(client, account: str, customer: str, invoice: str, card: str, decline: str, ts: int,
                         failure_class: str) -> None:
    """The customer's default card is ``card``; the invoice's first payment fails at ``ts`` on it with
    ``decline``. Waits for the recompute to read it as ``failure_class``."""
    default_card(client, customer, card, ts - DAY)
    post_event(client, invoice_event("invoice.payment_failed", customer, invoice, ts, ts - 3600))
    post_event(client, charge_failed(customer, ts + 1, decline, card))
    wait_for(lambda: dunning(client, account)["failure_class"] == failure_class, message=failure_class)


def test_insufficient_funds_recovers_on_the_third_retry(client, accounts: Accounts, engine, worker, celery_app,
                                                         fake_stripe):
    account, customer = accounts.create()
    invoice, card = unique("in"), unique("pm")
    t0 = datetime.now(UTC).replace(microsecond=0)
    ts = int(t0.timestamp())
    with freeze_time(t0, tick=True):
        first_payment_failed(client, account, customer, invoice, card, "insufficient_funds", ts, "transient")

    for n, day in enumerate((1, 3, 5), start=1):
        at = t0 + timedelta(days=day, minutes=10 * n)
        with freeze_time(at, tick=True):
            state = dunning(client, account)
            assert state["next_retry_at"] is not None, (n, state)
            assert datetime.fromisoformat(state["next_retry_at"]) <= at, (n, state)
            fake_stripe.script(outcomes.success() if n == 3 else outcomes.decline("insufficient_funds"))
            celery_app.send_task("tasks.dispatch_due_retries")
            def charged(n: int = n) -> bool:
                return len(fake_stripe.pay_requests(invoice)) == n

            wait_for(charged, message=f"retry {n} charged")
            now = int(at.timestamp())
            if n < 3:
                late = [invoice_event("invoice.payment_failed", customer, invoice, now + 2, ts - 3600,
                                      attempts=n + 1), charge_failed(customer, now + 1, "insufficient_funds", card)]
                for evt in reversed(late):  # the charge's detail before its invoice event
                    post_event(client, evt)
                def failed_and_planned(n: int = n) -> bool:
                    s = dunning(client, account)
                    return s["retries_used"] == n and s["next_retry_at"] is not None

                wait_for(failed_and_planned, message=f"retry {n} failed, next planned")
            else:
                post_event(client, invoice_event("invoice.paid", customer, invoice, now + 2, ts - 3600,
                                                 attempts=n + 1, paid=True))
                wait_for(lambda: dunning(client, account)["status"] == "current", message="paid on retry 3")
                # Stripe redelivers the second retry's failure after the payment, twice.
                for evt in late + late:
                    assert post_event(client, evt).status_code == 200
                support_recompute(client, account)

        with freeze_time(at + timedelta(minutes=5), tick=True):
            final = dunning(client, account)
    assert final["status"] == "current" and final["level"] == "none" and final["next_retry_at"] is None
    assert labels(client, account) == {invoice: "Paid"}
    keys = [r.idempotency_key for r in fake_stripe.pay_requests(invoice)]
    assert len(set(keys)) == 3, keys
    assert [r["state"] for r in retries(engine, account)] == ["failed", "failed", "sent"]
    events = outbox(engine, account)
    assert "BadDebtEntered" not in events and events[-1] in ("DunningResolved", "EntitlementsChanged",
                                                             "ConsequenceEased"), events


def relay(celery_app, fake_am, account: str, predicate: Any, message: str) -> Any:
    def delivered() -> Any:
        celery_app.send_task("tasks.relay_outbox")
        got = fake_am.entitlements(account)
        return got and predicate(got[-1].body) and got
    return wait_for(delivered, interval=0.5, message=message)


def test_expired_card_for_25_days_with_a_new_card_on_day_9_that_works(client, accounts: Accounts, engine, worker,
                                                                      celery_app, fake_stripe, fake_am):
    account, customer = accounts.create()
    invoice, old, new = unique("in"), unique("pm"), unique("pm")
    t0 = datetime.now(UTC).replace(microsecond=0)
    ts = int(t0.timestamp())
    with freeze_time(t0, tick=True):
        first_payment_failed(client, account, customer, invoice, old, "expired_card", ts, "permanent")

    with freeze_time(t0 + timedelta(days=4), tick=True):
        assert support_recompute(client, account)["level"] == "restrict_premium"  # permanent for 3+ days

    day9 = t0 + timedelta(days=9)
    n9 = int(day9.timestamp())
    with freeze_time(day9, tick=True):
        post_event(client, event("payment_method.attached", id=new, customer=customer, created=n9))
        default_card(client, customer, new, n9 + 1)
        wait_for(lambda: dunning(client, account)["next_retry_at"] is not None, message="free retry planned")
    with freeze_time(day9 + timedelta(minutes=1), tick=True):
        fake_stripe.script(outcomes.success())
        celery_app.send_task("tasks.dispatch_due_retries")
        (request,) = wait_for(lambda: fake_stripe.pay_requests(invoice), message="free retry charged")
        assert request.params.get("payment_method") in (None, [new]), request.params
        post_event(client, invoice_event("invoice.paid", customer, invoice, n9 + 90, ts - 3600, attempts=2,
                                         paid=True))
        wait_for(lambda: dunning(client, account)["status"] == "current", message="paid with the new card")

    with freeze_time(t0 + timedelta(days=25), tick=True):
        celery_app.send_task("tasks.drift_sweep")
        support_recompute(client, account)
        state = dunning(client, account)
        relay(celery_app, fake_am, account, lambda b: b.get("products", {}).get("prod_core") in (None, "full")
              or "full" in str(b), "full entitlements delivered")
    assert state["status"] == "current" and state["level"] == "none" and state["bad_debt"] is False
    assert labels(client, account) == {invoice: "Paid"}
    assert not [r for r in fake_am.for_account(account) if r.kind == "cancellations"]
    events = outbox(engine, account)
    assert "BadDebtEntered" not in events and "CancellationRequested" not in events, events
    assert len(fake_stripe.pay_requests(invoice)) == 1


def test_an_upgrade_whose_proration_never_pays_is_reverted_never_bad_debt(client, accounts: Accounts, engine, worker,
                                                                          celery_app, fake_stripe, fake_am):
    """DESIGN 4: the proration of an upgrade fails through all its retries while the base subscription
    is paid; on day 30 the next base invoice is paid too. Only the upgrade is withheld and reverted."""
    account, customer = accounts.create()
    base, upgrade, card = unique("in"), unique("in"), unique("pm")
    t0 = datetime.now(UTC).replace(microsecond=0)
    ts = int(t0.timestamp())

    def upgrade_event(kind: str, at: int, attempts: int) -> dict[str, Any]:
        evt = event(kind, id=upgrade, customer=customer, created=at, attempt_count=attempts,
                    billing_reason="subscription_update", amount_due=2500, amount_paid=0, amount_remaining=2500,
                    status="open", paths={"created": ts - 60})
        return with_product(evt, "prod_premium_analytics", 2500)

    with freeze_time(t0, tick=True):
        default_card(client, customer, card, ts - DAY)
        post_event(client, invoice_event("invoice.paid", customer, base, ts - DAY, ts - DAY - 60, paid=True))
        post_event(client, upgrade_event("invoice.payment_failed", ts, 1))
        post_event(client, charge_failed(customer, ts + 1, "insufficient_funds", card))
        wait_for(lambda: dunning(client, account)["failure_class"] == "transient", message="upgrade failed")

    fake_stripe.default = outcomes.decline("insufficient_funds")
    n = 0
    for day in range(1, 23):
        at = t0 + timedelta(days=day, hours=1)
        with freeze_time(at, tick=True):
            state = dunning(client, account)
            due = state["next_retry_at"] and datetime.fromisoformat(state["next_retry_at"]) <= at
            if not due:
                continue
            n += 1
            celery_app.send_task("tasks.dispatch_due_retries")
            def upgrade_charged(n: int = n) -> bool:
                return len(fake_stripe.pay_requests(upgrade)) == n

            wait_for(upgrade_charged, message=f"upgrade retry {n}")
            now = int(at.timestamp())
            post_event(client, upgrade_event("invoice.payment_failed", now + 2, n + 1))
            post_event(client, charge_failed(customer, now + 1, "insufficient_funds", card))
            def upgrade_failed(n: int = n) -> bool:
                return dunning(client, account)["retries_used"] == n

            wait_for(upgrade_failed, message=f"retry {n} failed")

    day30 = t0 + timedelta(days=30)
    n30 = int(day30.timestamp())
    with freeze_time(day30, tick=True):
        nxt = unique("in")
        post_event(client, invoice_event("invoice.paid", customer, nxt, n30, n30 - 60, paid=True))
        support_recompute(client, account)
        wait_for(lambda: nxt in labels(client, account), message="next base invoice mirrored")
        wait_for(lambda: "UpgradeRevertRequested" in outbox(engine, account), timeout=30,
                 message="upgrade revert requested")
        state = dunning(client, account)
        wait_for(lambda: (celery_app.send_task("tasks.relay_outbox") and False)
                 or any(r.kind == "cancellations" for r in fake_am.for_account(account)), timeout=30,
                 interval=0.5, message="revert delivered")
    assert n == 6, n
    assert state["bad_debt"] is False and state["status"] == "past_due", state
    # The base product, paid, in full: known from its invoices only (the mirror has no event of the
    # subscription), it stays in the entitlements Account Management is sent whole.
    assert state["entitlements"]["products"] == {"prod_core": "full", "prod_premium_analytics": "withheld"}, \
        state["entitlements"]
    assert labels(client, account) == {base: "Paid", nxt: "Paid", upgrade: "Past due"}
    events = outbox(engine, account)
    assert "BadDebtEntered" not in events and "CancellationRequested" not in events, events
    (revert,) = [r for r in fake_am.for_account(account) if r.kind == "cancellations"]
    assert revert.body.get("action") == "revert_upgrade", revert.body
