"""A failed invoice no webhook explained: beat asks Stripe's API why (app/payments/attempt_detail.py).

invoice.payment_failed carries no decline code; when the charge.failed / payment_intent.payment_failed
that does never comes, the failure stays ``unknown`` and is retried like a transient one, so a dead
card would be charged again. The fake Stripe answers as Stripe does (its invoice payments and payment
intents, the real fixtures with ids and values overridden), failures included.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from prometheus_client import REGISTRY

from app.dispatch import send
from app.payments.attempt_detail import GRACE, fetch_missing_detail
from app.recompute.service import run_recompute
from tests.conftest import post_event, wait_for
from tests.integration.dunning_setup import dunning_row
from tests.stripe_events import event, unique, with_product

MINUTES_AGO = 15  # past the grace the webhooks get


def unexplained_failure(client, stripe_fake, customer: str, decline: str | None = "expired_card",
                        minutes_ago: float = MINUTES_AGO, amount: int = 5000) -> str:
    """invoice.payment_failed and nothing else; Stripe holds the declined intent when ``decline``."""
    t = int(time.time() - minutes_ago * 60)
    invoice = unique("in")
    evt = event("invoice.payment_failed", id=invoice, customer=customer, created=t, amount_due=amount,
                amount_remaining=amount, amount_paid=0, attempt_count=1, billing_reason="subscription_cycle",
                paths={"created": t - 86400})
    assert post_event(client, with_product(evt, "prod_core", amount)).status_code == 200
    if decline is not None:
        stripe_fake.fail_invoice(invoice, customer, decline, amount)
    return invoice


def its_charge_failed(client, stripe_fake, invoice: str, customer: str, amount: int,
                      minutes_ago: float = MINUTES_AGO) -> None:
    """The charge.failed of the declined intent Stripe holds for ``invoice``, as Stripe sends it:
    naming the intent and no invoice (API 2025-03-31 and later)."""
    [pi] = [p["payment"]["payment_intent"] for p in stripe_fake.payments_by_invoice[invoice]]
    error = stripe_fake.intents[pi]["last_payment_error"]
    t = int(time.time() - minutes_ago * 60)
    charge = event("charge.failed", id=error["charge"], customer=customer, payment_intent=pi, amount=amount,
                   failure_code="card_declined", created=t,
                   paths={"created": t, "outcome.reason": error["decline_code"]})
    assert post_event(client, charge).status_code == 200


def attempt_rows(engine, customer: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.exec_driver_sql(
            "SELECT id, invoice_id, status, decline_code, failure_code, attempted_at FROM stripe_payment_attempt "
            "WHERE stripe_customer_id = %(c)s", {"c": customer}).mappings()]


def asked(stripe_fake) -> list[str]:
    return [c.path for c in stripe_fake.calls if c.method == "GET"]


def now() -> datetime:
    return datetime.now(UTC)


@pytest.mark.worker
def test_a_dead_card_no_webhook_explained_is_learnt_from_stripe_and_not_retried(client, engine, accounts,
                                                                                 stripe_fake, worker, celery_app):
    account, customer = accounts.create()
    invoice = unexplained_failure(client, stripe_fake, customer, "expired_card")
    wait_for(lambda: dunning_row(engine, account).get("failure_class") == "unknown", message="the failure recomputed")
    before = dunning_row(engine, account)
    assert before["next_retry_at"] is not None  # unknown: retried, on a card that has expired

    send(celery_app, "tasks.fetch_attempt_detail")  # beat's tick
    wait_for(lambda: dunning_row(engine, account).get("failure_class") == "permanent",
             message="the decline from Stripe recomputed")
    after = dunning_row(engine, account)
    assert after["next_retry_at"] is None and after["status"] == "past_due"
    [attempt] = attempt_rows(engine, customer)
    assert (attempt["invoice_id"], attempt["status"], attempt["decline_code"]) == (invoice, "failed", "expired_card")
    # Timed at the invoice's failure, not at the moment Stripe was asked.
    assert attempt["attempted_at"] < now() - timedelta(minutes=MINUTES_AGO - 1)
    assert asked(stripe_fake) == [f"/v1/invoice_payments?invoice={invoice}&limit=10",
                                  f"/v1/payment_intents/{attempt['id']}"]


def found_count() -> float:
    return REGISTRY.get_sample_value("dunning_attempt_detail_asked_total", {"outcome": "found"}) or 0.0


def test_each_failure_is_asked_about_once(client, engine, runtime, accounts, stripe_fake, celery_app):
    _, customer = accounts.create()
    unexplained_failure(client, stripe_fake, customer, "stolen_card")
    counted = found_count()
    first = fetch_missing_detail(runtime, celery_app, now())
    assert (first.asked, len(first.found), first.none, first.errors) == (1, 1, 0, 0)
    assert found_count() == counted + 1
    calls = len(stripe_fake.calls)
    again = fetch_missing_detail(runtime, celery_app, now())
    assert again.asked == 0 and len(stripe_fake.calls) == calls


def test_a_failure_a_webhook_explained_is_not_asked_about(client, engine, runtime, accounts, stripe_fake,
                                                          celery_app):
    _, customer = accounts.create()
    invoice = unexplained_failure(client, stripe_fake, customer, "insufficient_funds")
    [pi] = [p["payment"]["payment_intent"] for p in stripe_fake.payments_by_invoice[invoice]]
    failed = event("payment_intent.payment_failed", id=pi, customer=customer, amount=5000,
                   created=int(time.time() - MINUTES_AGO * 60) + 1)
    assert post_event(client, failed).status_code == 200
    assert fetch_missing_detail(runtime, celery_app, now()).asked == 0
    assert asked(stripe_fake) == []


def test_a_renewal_awaiting_authentication_whose_webhook_came_is_not_asked_about(client, engine, runtime, accounts,
                                                                                stripe_fake, celery_app):
    _, customer = accounts.create()
    invoice = unexplained_failure(client, stripe_fake, customer, decline=None)
    intent = stripe_fake.fail_invoice(invoice, customer, "authentication_required", 5000, status="requires_action")
    # The intent's own event, as Stripe sends it with the renewal's invoice.payment_failed (the
    # payment_intent fixture's envelope under the event type it has).
    waiting = event("payment_intent.payment_failed", id=intent["id"], customer=customer, amount=5000,
                    status="requires_action", created=int(time.time() - MINUTES_AGO * 60) + 1)
    waiting["type"] = "payment_intent.requires_action"
    assert post_event(client, waiting).status_code == 200
    assert fetch_missing_detail(runtime, celery_app, now()).asked == 0
    assert asked(stripe_fake) == []


def test_a_failure_is_given_its_webhooks_first(client, engine, runtime, accounts, stripe_fake, celery_app):
    _, customer = accounts.create()
    unexplained_failure(client, stripe_fake, customer, "expired_card", minutes_ago=1)
    assert fetch_missing_detail(runtime, celery_app, now()).asked == 0
    later = fetch_missing_detail(runtime, celery_app, now() + GRACE)
    assert len(later.found) == 1


def test_a_failure_stripe_shows_no_declined_intent_for_is_left_as_it_is(client, engine, runtime, accounts,
                                                                         stripe_fake, celery_app):
    _, customer = accounts.create()
    unexplained_failure(client, stripe_fake, customer, decline=None)  # no payment listed at Stripe
    report = fetch_missing_detail(runtime, celery_app, now())
    assert (report.asked, report.none, report.found) == (1, 1, [])
    assert attempt_rows(engine, customer) == []
    assert fetch_missing_detail(runtime, celery_app, now()).asked == 0  # once


def test_a_stripe_error_leaves_the_failure_for_the_next_pass(client, engine, runtime, accounts, stripe_fake,
                                                             celery_app):
    _, customer = accounts.create()
    invoice = unexplained_failure(client, stripe_fake, customer, "lost_card")
    stripe_fake.invoice_payments_down = True
    down = fetch_missing_detail(runtime, celery_app, now())
    assert (down.asked, down.errors, down.found) == (1, 1, [])
    stripe_fake.invoice_payments_down = False
    back = fetch_missing_detail(runtime, celery_app, now())
    assert back.found == [invoice]
    assert [a["decline_code"] for a in attempt_rows(engine, customer)] == ["lost_card"]


def test_a_rate_limit_ends_the_pass_and_leaves_the_rest_for_the_next(client, engine, runtime, accounts,
                                                                     stripe_fake, celery_app):
    customers = [accounts.create()[1] for _ in range(3)]
    invoices = [unexplained_failure(client, stripe_fake, c, "expired_card", minutes_ago=MINUTES_AGO + n)
                for n, c in enumerate(customers)]
    stripe_fake.invoice_payments_rate_limited = True
    limited = fetch_missing_detail(runtime, celery_app, now())
    assert (limited.asked, limited.errors) == (1, 1)  # the first answer was a 429: nothing more asked
    assert len(asked(stripe_fake)) == 1
    stripe_fake.invoice_payments_rate_limited = False
    the_pause_is_over(engine, "attempt_detail")  # the next tick, after the 429's Retry-After (1 s)
    later = fetch_missing_detail(runtime, celery_app, now())
    assert sorted(later.found) == sorted(invoices)


def pause_left(engine, lock: str) -> float:
    """The seconds a rate limit still holds the pass back, by the database's clock."""
    with engine.connect() as conn:
        return float(conn.exec_driver_sql("SELECT extract(epoch FROM not_before - now()) FROM stripe_pass_pause "
                                          "WHERE name = %(n)s", {"n": lock}).scalar_one())


def the_pause_is_over(engine, lock: str) -> None:
    """The time the rate limit asked for has passed (the pause is kept by the database's clock)."""
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE stripe_pass_pause SET not_before = now() - interval '1 second' "
                             "WHERE name = %(n)s", {"n": lock})


def test_a_rate_limit_holds_the_next_passes_back_as_long_as_its_retry_after_asks(client, engine, runtime, accounts,
                                                                                 stripe_fake, celery_app):
    """A 429 ended the pass, and beat's next tick (a minute on) asked Stripe again whatever the
    answer's Retry-After said: each tick spent on a key still limited, the limit prolonged. The next
    passes ask nothing (on any worker: the time is the database's) until Retry-After has passed."""
    _, customer = accounts.create()
    invoice = unexplained_failure(client, stripe_fake, customer)
    stripe_fake.rate_limit_retry_after = 300
    stripe_fake.invoice_payments_rate_limited = True
    assert fetch_missing_detail(runtime, celery_app, now()).errors == 1
    stripe_fake.invoice_payments_rate_limited = False
    held = fetch_missing_detail(runtime, celery_app, now())  # beat's next tick: within the 300 s asked for
    assert (held.paused, held.asked) == (True, 0) and len(asked(stripe_fake)) == 1
    assert 60 < pause_left(engine, "attempt_detail") <= 300  # past beat's next tick, no longer than asked
    the_pause_is_over(engine, "attempt_detail")
    assert fetch_missing_detail(runtime, celery_app, now()).found == [invoice]


def test_a_rate_limits_retry_after_holds_the_pass_back_ten_minutes_at_most(client, engine, runtime, accounts,
                                                                            stripe_fake, celery_app):
    """An answer asking for a day (or a proxy's garbage) must not stop asking for a day."""
    from app.payments.stripe_pass import MAX_PAUSE_SECONDS

    _, customer = accounts.create()
    unexplained_failure(client, stripe_fake, customer)
    stripe_fake.rate_limit_retry_after = 86400
    stripe_fake.invoice_payments_rate_limited = True
    fetch_missing_detail(runtime, celery_app, now())
    assert MAX_PAUSE_SECONDS - 60 < pause_left(engine, "attempt_detail") <= MAX_PAUSE_SECONDS == 600


def test_nothing_is_asked_without_a_stripe_key(client, engine, runtime, accounts, stripe_fake, celery_app,
                                               monkeypatch):
    from tasks import payments  # noqa: F401  registers the task with the app

    _, customer = accounts.create()
    unexplained_failure(client, stripe_fake, customer, "expired_card")
    monkeypatch.setattr(runtime, "settings", runtime.settings.with_overrides(stripe_api_key=""))
    assert celery_app.tasks["tasks.fetch_attempt_detail"].apply().get() == {"skipped": "STRIPE_API_KEY is not set",
                                                                        "deferred": True}
    assert asked(stripe_fake) == []


def test_a_pass_that_stops_half_way_leaves_the_failures_it_did_not_ask_about(client, engine, runtime, accounts,
                                                                            stripe_fake, celery_app, monkeypatch):
    """The task's soft time limit strikes during the first Stripe call (a slow Stripe): nothing was
    marked asked but what Stripe answered, so the next pass asks about all of them."""
    import app.payments.attempt_detail as attempt_detail

    customers = [accounts.create()[1] for _ in range(3)]
    invoices = [unexplained_failure(client, stripe_fake, c, "expired_card", minutes_ago=MINUTES_AGO + n)
                for n, c in enumerate(customers)]
    ask = attempt_detail._failed_intent

    def time_is_up(*args: Any) -> Any:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(attempt_detail, "_failed_intent", time_is_up)
    with pytest.raises(SoftTimeLimitExceeded):
        fetch_missing_detail(runtime, celery_app, now())
    monkeypatch.setattr(attempt_detail, "_failed_intent", ask)
    assert sorted(fetch_missing_detail(runtime, celery_app, now()).found) == sorted(invoices)


def test_an_invoice_stripe_does_not_know_is_asked_about_once_and_holds_up_no_other(client, engine, runtime,
                                                                                  accounts, stripe_fake,
                                                                                  celery_app):
    _, unknown_customer = accounts.create()
    unknown = unexplained_failure(client, stripe_fake, unknown_customer, "expired_card", minutes_ago=MINUTES_AGO + 5)
    stripe_fake.unknown_invoices.add(unknown)
    _, customer = accounts.create()
    known = unexplained_failure(client, stripe_fake, customer, "expired_card")
    reports = [fetch_missing_detail(runtime, celery_app, now(), limit=1) for _ in range(3)]
    assert [(r.asked, r.errors, r.found) for r in reports] == [(1, 1, []), (1, 0, [known]), (0, 0, [])]


def test_a_failure_of_another_invoice_at_the_same_moment_explains_only_its_own(client, engine, runtime, accounts,
                                                                             stripe_fake, celery_app):
    """Two subscriptions of one customer renew and fail together; only the first invoice's
    charge.failed arrives, naming no invoice (API 2025-03-31 and later). It is of the first one's
    amount: the second failure is still unexplained, and asked about."""
    _, customer = accounts.create()
    first = unexplained_failure(client, stripe_fake, customer, "insufficient_funds", amount=5000)
    second = unexplained_failure(client, stripe_fake, customer, "expired_card", amount=7000)
    its_charge_failed(client, stripe_fake, first, customer, 5000)
    report = fetch_missing_detail(runtime, celery_app, now())
    assert report.found == [second]


def test_a_decline_of_a_later_failure_of_another_invoice_explains_none_of_this_one(client, engine, runtime,
                                                                                  accounts, stripe_fake,
                                                                                  celery_app):
    """The same price, the second invoice failing three minutes after the first: its decline (naming no
    invoice) is not the first one's, whose own next attempt would have moved its failure time."""
    _, customer = accounts.create()
    first = unexplained_failure(client, stripe_fake, customer, "expired_card", minutes_ago=15)
    second = unexplained_failure(client, stripe_fake, customer, "insufficient_funds", minutes_ago=12)
    its_charge_failed(client, stripe_fake, second, customer, 5000, minutes_ago=12)
    assert fetch_missing_detail(runtime, celery_app, now()).found == [first]


def test_one_pass_at_a_time(client, engine, runtime, accounts, stripe_fake, celery_app):
    from app.db import session_lock
    from app.payments.attempt_detail import LOCK

    _, customer = accounts.create()
    unexplained_failure(client, stripe_fake, customer, "expired_card")
    with session_lock(engine, LOCK) as got:
        assert got
        busy = fetch_missing_detail(runtime, celery_app, now())
    assert busy.busy and busy.asked == 0 and asked(stripe_fake) == []
    assert len(fetch_missing_detail(runtime, celery_app, now()).found) == 1


def test_two_invoices_of_one_price_failing_together_are_not_explained_by_one_decline(client, engine, runtime,
                                                                                    accounts, stripe_fake,
                                                                                    celery_app):
    """Two subscriptions of one customer at one price renew and fail together; one charge.failed
    arrives, naming no invoice: it could be either's, so Stripe is asked about both. The first's
    answer is that charge, which is only linked to it (its times stay as the webhook gave them); the
    second's is its own decline. Each invoice is then judged by its own card."""
    account, customer = accounts.create()
    first = unexplained_failure(client, stripe_fake, customer, "insufficient_funds", amount=5000)
    second = unexplained_failure(client, stripe_fake, customer, "expired_card", amount=5000)
    its_charge_failed(client, stripe_fake, first, customer, 5000)
    [webhooks_row] = attempt_rows(engine, customer)
    assert webhooks_row["invoice_id"] is None
    assert sorted(fetch_missing_detail(runtime, celery_app, now()).found) == sorted([first, second])
    rows = {a["invoice_id"]: a for a in attempt_rows(engine, customer)}
    assert {inv: a["decline_code"] for inv, a in rows.items()} == {first: "insufficient_funds",
                                                                    second: "expired_card"}
    assert rows[first]["attempted_at"] == webhooks_row["attempted_at"]
    summary = run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED", now()).summary()
    classes = {r["facts"]["invoice"]: r["facts"].get("failure_class") for r in summary["reasons"]
               if r["rule"].startswith("retry.") and "invoice" in r["facts"]}
    assert classes.get(second) == "permanent" and classes.get(first) != "permanent", summary["reasons"]


def test_a_later_failure_with_no_new_attempt_does_not_move_the_earlier_decline(client, engine, runtime, accounts,
                                                                              stripe_fake, celery_app):
    """Declined at T1 (asked, mirrored at T1); at T2 Stripe's next try fails with no attempt at all
    (invoice.payment_failed only). Stripe's newest failed intent is still T1's: no news, and the
    attempt keeps its time (the retry schedule and the guard go by it)."""
    _, customer = accounts.create()
    invoice = unexplained_failure(client, stripe_fake, customer, "expired_card", minutes_ago=120)
    assert len(fetch_missing_detail(runtime, celery_app, now()).found) == 1
    [before] = attempt_rows(engine, customer)
    t2 = int(time.time() - MINUTES_AGO * 60)
    again = event("invoice.payment_failed", id=invoice, customer=customer, created=t2, amount_due=5000,
                  amount_remaining=5000, amount_paid=0, attempt_count=2, billing_reason="subscription_cycle",
                  paths={"created": t2 - 86400})
    assert post_event(client, with_product(again, "prod_core", 5000)).status_code == 200
    second = fetch_missing_detail(runtime, celery_app, now())
    assert (second.asked, second.none, second.found) == (1, 1, [])
    assert attempt_rows(engine, customer) == [before]
    assert fetch_missing_detail(runtime, celery_app, now()).asked == 0  # asked once


def test_a_same_price_invoice_paid_since_still_leaves_the_decline_ambiguous(client, engine, runtime, accounts,
                                                                          stripe_fake, celery_app):
    """Two subscriptions at one price fail together; only the first's charge.failed arrives (an
    expired card, naming no invoice), and the customer pays the second on the hosted page within
    minutes. Which invoice the decline was is still Stripe's to say: the first is asked about, and
    its card is judged dead."""
    account, customer = accounts.create()
    first = unexplained_failure(client, stripe_fake, customer, "expired_card")
    second = unexplained_failure(client, stripe_fake, customer, "insufficient_funds")
    its_charge_failed(client, stripe_fake, first, customer, 5000)
    paid_at = int(time.time() - (MINUTES_AGO - 5) * 60)
    paid = event("invoice.paid", id=second, customer=customer, created=paid_at, amount_due=5000, amount_paid=5000,
                 amount_remaining=0, billing_reason="subscription_cycle",
                 paths={"created": paid_at - 86400, "status_transitions.paid_at": paid_at})
    assert post_event(client, with_product(paid, "prod_core", 5000)).status_code == 200
    assert fetch_missing_detail(runtime, celery_app, now()).found == [first]
    summary = run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED", now()).summary()
    assert summary["failure_class"] == "permanent" and summary["next_retry_at"] is None, summary["reasons"]


def test_a_renewal_the_issuer_wants_authenticated_is_not_retried_off_session(client, engine, runtime, accounts,
                                                                            stripe_fake, celery_app):
    """Stripe moves an off-session renewal's intent to requires_action with invoice.payment_failed; no
    payment_intent event came. Its answer says the customer must act: no automatic retry."""
    account, customer = accounts.create()
    invoice = unexplained_failure(client, stripe_fake, customer, decline=None)
    stripe_fake.fail_invoice(invoice, customer, "authentication_required", 5000, status="requires_action")
    report = fetch_missing_detail(runtime, celery_app, now())
    assert report.found == [invoice]
    [attempt] = attempt_rows(engine, customer)
    assert (attempt["invoice_id"], attempt["status"]) == (invoice, "requires_action")
    summary = run_recompute(engine, runtime.policy, account, "PAYMENT_FAILED", now()).summary()
    assert summary["failure_class"] == "action_required" and summary["next_retry_at"] is None, summary["reasons"]


def test_the_pass_and_a_webhook_of_the_invoice_at_the_same_moment_do_not_deadlock(client, engine, runtime, accounts,
                                                                                  stripe_fake, celery_app):
    """Webhook ingest locks the account's recompute request and then the invoice's mirror row (as
    every writer of both does). The pass recording what Stripe answered locked them the other way
    round (the invoice, marked asked, then the request): a webhook of the invoice arriving meanwhile
    (its retry's invoice.payment_failed) deadlocked with it, and PostgreSQL aborted one of them: the
    webhook answered 503, or the pass failed and asked Stripe again next time."""
    from tests.integration.lock_order import pass_during_a_webhook
    from webhooks.mirror import extract

    account, customer = accounts.create()
    invoice = unexplained_failure(client, stripe_fake, customer, "expired_card")
    t = int(time.time())
    again = event("invoice.payment_failed", id=invoice, customer=customer, created=t, amount_due=5000,
                  amount_remaining=5000, amount_paid=0, attempt_count=2, billing_reason="subscription_cycle",
                  paths={"created": t - 86400})
    rows = [r for r in extract(with_product(again, "prod_core", 5000)).rows if r.table == "stripe_invoice"]
    errors = pass_during_a_webhook(engine, account, again["id"], rows,
                                   lambda: fetch_missing_detail(runtime, celery_app, now()))
    assert not errors, errors
    [attempt] = attempt_rows(engine, customer)
    assert (attempt["invoice_id"], attempt["decline_code"]) == (invoice, "expired_card")


def test_an_answer_the_mirror_cannot_store_costs_that_failure_only(client, engine, runtime, accounts, stripe_fake,
                                                                   celery_app):
    """Stripe's intent for one failure holds a value the mirror cannot store (an amount beyond what a
    bigint holds, which the database refuses; ingest refuses such an event as not storable). It failed
    the whole pass (the database's DataError), and being
    the oldest failure it was asked about first again at every pass: no failure behind it was ever
    explained (each read as unknown and retried on its dead card), and the beat task gave up as dead
    stuck work every minute. It is asked about once, counted as an error; the pass goes on."""
    _, odd_customer = accounts.create()
    odd = unexplained_failure(client, stripe_fake, odd_customer, "expired_card", minutes_ago=MINUTES_AGO + 5)
    [pi] = [p["payment"]["payment_intent"] for p in stripe_fake.payments_by_invoice[odd]]
    stripe_fake.intents[pi]["amount"] = 10 ** 20
    _, customer = accounts.create()
    known = unexplained_failure(client, stripe_fake, customer, "expired_card")
    first = fetch_missing_detail(runtime, celery_app, now())
    assert (first.asked, first.errors, first.found) == (2, 1, [known])
    assert [a["decline_code"] for a in attempt_rows(engine, customer)] == ["expired_card"]
    assert attempt_rows(engine, odd_customer) == []  # nothing of the odd answer stored
    again = fetch_missing_detail(runtime, celery_app, now())
    assert (again.asked, again.errors, again.found) == (0, 0, [])
