"""An invoice whose webhook carried its first lines only: beat fetches the whole list from Stripe
(app/payments/invoice_lines.py) and the products on its later lines get their consequences.

Stripe's invoice object in an event carries the first handful of its line items (``lines.has_more``);
the mirror took them for all of them, so a product on a later line of an unpaid invoice kept full
access (DESIGN section 4: consequences apply to the products on the unpaid invoices). The fake Stripe
lists the lines as Stripe does (the real line_item fixture, paginated), failures included.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest

from app.payments.invoice_lines import fetch_incomplete_lines
from app.recompute.service import run_recompute
from app.stuck_work import DEFERRED
from tests.conftest import post_event
from tests.integration.dunning_setup import dunning_row
from tests.integration.test_attempt_detail import pause_left, the_pause_is_over
from tests.stripe_events import event, unique, with_product

DAYS_AGO = 8  # past the restrict_premium rule's 7 days
# Stripe's whole list: more lines than a page (100), the premium product on the last one only.
WHOLE = [("prod_core", 50)] * 100 + [("prod_premium", 2000)]


def first_lines_failed(client, customer: str, event_type: str = "invoice.payment_failed",
                       invoice: str | None = None, created: int | None = None,
                       event_id: str | None = None) -> dict[str, Any]:
    """The invoice's event carrying its first line (prod_core) and has_more, as Stripe sends an
    invoice with more lines than the event holds."""
    t = created if created is not None else int(time.time() - DAYS_AGO * 86400)
    evt = event(event_type, event_id=event_id, id=invoice or unique("in"), customer=customer, created=t,
                amount_due=7000, amount_remaining=7000, amount_paid=0, attempt_count=1,
                billing_reason="subscription_cycle", paths={"created": t - 86400, "lines.has_more": True})
    evt = with_product(evt, "prod_core", 50)
    assert post_event(client, evt).status_code == 200
    return evt


def retried(first: dict[str, Any], customer: str, *, has_more: bool = False) -> dict[str, Any]:
    """The invoice of ``first`` failing again a minute later (not posted); its lines are the
    fixture's, and say has_more only when asked."""
    paths: dict[str, Any] = {"created": first["created"] - 86400}
    if has_more:
        paths["lines.has_more"] = True
    return event("invoice.payment_failed", id=first["data"]["object"]["id"], customer=customer,
                 created=first["created"] + 60, amount_due=7000, amount_remaining=7000, amount_paid=0,
                 attempt_count=2, billing_reason="subscription_cycle", paths=paths)


def recompute(engine, runtime, account: str) -> dict[str, Any]:
    run_recompute(engine, runtime.policy, account, "STATE_REFRESH", datetime.now(UTC))
    return dunning_row(engine, account)


def products(row: dict[str, Any]) -> dict[str, str]:
    return dict(row["entitlements"]["products"])


def incomplete_reasons(row: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in row["reasons"] if r["rule"] == "lines.incomplete"]


def mirrored(engine, invoice: str) -> tuple[list[str], bool]:
    with engine.connect() as conn:
        lines, incomplete = conn.exec_driver_sql(
            "SELECT lines, lines_incomplete FROM stripe_invoice WHERE id = %(i)s", {"i": invoice}).one()
    return [ln["product"] for ln in lines], incomplete


def lines_asked(stripe_fake) -> list[str]:
    return [c.path for c in stripe_fake.calls if c.method == "GET" and c.path.split("?")[0].endswith("/lines")]


def test_a_product_only_on_a_later_line_is_restricted_once_the_whole_list_is_fetched(
        client, engine, runtime, accounts, stripe_fake, celery_app):
    account, customer = accounts.create()
    invoice = first_lines_failed(client, customer)["data"]["object"]["id"]
    stripe_fake.set_lines(invoice, WHOLE)

    before = recompute(engine, runtime, account)
    assert before["level"] == "restrict_premium"
    # Only the event's first line is known: the premium product on a later one keeps full access,
    # and the reasons say why.
    assert products(before).get("prod_premium", "full") == "full"
    [reason] = incomplete_reasons(before)
    assert reason["facts"] == {"invoice": invoice, "products_known": ["prod_core"]}
    assert mirrored(engine, invoice) == (["prod_core"], True)

    report = fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC))
    assert (report.asked, report.fetched, report.errors) == (1, [invoice], 0)
    # Every page, as Stripe paginates: 100 a page, then from the last line of the first.
    assert [p.split("?")[0] for p in lines_asked(stripe_fake)] == [f"/v1/invoices/{invoice}/lines"] * 2
    assert "starting_after=" in lines_asked(stripe_fake)[1]
    assert mirrored(engine, invoice) == ([p for p, _ in WHOLE], False)
    with engine.connect() as conn:  # the account's recompute is requested with it
        cause = conn.exec_driver_sql("SELECT cause FROM recompute_request WHERE account_id = %(a)s",
                                     {"a": account}).scalar()
    assert cause == f"invoice_lines:{invoice}"

    after = recompute(engine, runtime, account)
    assert after["level"] == "restrict_premium"
    assert products(after)["prod_premium"] == "revoked" and products(after)["prod_core"] == "full"
    assert incomplete_reasons(after) == []
    # Asked once: the invoice's lines are whole now.
    assert fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC)).asked == 0


def test_a_later_event_with_the_first_lines_does_not_undo_the_whole_list(client, engine, runtime, accounts,
                                                                        stripe_fake, celery_app):
    account, customer = accounts.create()
    first = first_lines_failed(client, customer)
    invoice = first["data"]["object"]["id"]
    stripe_fake.set_lines(invoice, WHOLE)
    assert fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC)).fetched == [invoice]

    # The same event redelivered; Stripe's next failure of the invoice (a newer event), and an older
    # one delivered late: each carries the first line only, with has_more.
    assert post_event(client, first).status_code == 200
    first_lines_failed(client, customer, invoice=invoice, created=int(time.time()) - 60)
    first_lines_failed(client, customer, event_type="invoice.finalized", invoice=invoice,
                       created=first["created"] - 3600)

    assert mirrored(engine, invoice) == ([p for p, _ in WHOLE], False)
    row = recompute(engine, runtime, account)
    assert products(row)["prod_premium"] == "revoked" and incomplete_reasons(row) == []
    assert fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC)).asked == 0


def test_a_stripe_5xx_leaves_the_invoice_for_the_next_pass(client, engine, runtime, accounts, stripe_fake,
                                                           celery_app):
    account, customer = accounts.create()
    invoice = first_lines_failed(client, customer)["data"]["object"]["id"]
    stripe_fake.set_lines(invoice, WHOLE)
    stripe_fake.invoice_lines_down = True
    down = fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC))
    assert (down.asked, down.fetched, down.errors) == (1, [], 1)
    assert mirrored(engine, invoice) == (["prod_core"], True)
    assert len(incomplete_reasons(recompute(engine, runtime, account))) == 1

    stripe_fake.invoice_lines_down = False
    back = fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC))
    assert back.fetched == [invoice]
    assert products(recompute(engine, runtime, account))["prod_premium"] == "revoked"


def test_a_rate_limit_ends_the_pass_and_leaves_the_rest_for_the_next(client, engine, runtime, accounts,
                                                                     stripe_fake, celery_app):
    invoices = []
    for _ in range(2):
        _, customer = accounts.create()
        invoice = first_lines_failed(client, customer)["data"]["object"]["id"]
        stripe_fake.set_lines(invoice, WHOLE)
        invoices.append(invoice)
    stripe_fake.invoice_lines_rate_limited = True
    limited = fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC))
    assert (limited.asked, limited.errors) == (1, 1) and len(lines_asked(stripe_fake)) == 1
    stripe_fake.invoice_lines_rate_limited = False
    the_pause_is_over(engine, "invoice_lines")  # the next tick, after the 429's Retry-After (1 s)
    assert sorted(fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC)).fetched) == sorted(invoices)


def test_a_rate_limit_holds_the_next_ticks_back_as_long_as_its_retry_after_asks(client, engine, runtime, accounts,
                                                                                stripe_fake, celery_app):
    """A 429 ended the pass, and beat's next tick (a minute on) asked Stripe again whatever the
    answer's Retry-After said. The next ticks ask nothing until it has passed (by the database's
    clock, on any worker), and such a tick resolves no stuck row of an earlier one (it did nothing)."""
    from tasks import payments  # noqa: F401  registers the task with the app

    _, customer = accounts.create()
    invoice = first_lines_failed(client, customer)["data"]["object"]["id"]
    stripe_fake.set_lines(invoice, WHOLE)
    stripe_fake.rate_limit_retry_after = 300
    stripe_fake.invoice_lines_rate_limited = True
    assert fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC)).errors == 1
    stripe_fake.invoice_lines_rate_limited = False
    held = celery_app.tasks["tasks.fetch_invoice_lines"].apply().get()  # beat's next tick
    assert (held["paused"], held["asked"], held.get(DEFERRED)) == (True, 0, True)
    assert len(lines_asked(stripe_fake)) == 1
    assert 60 < pause_left(engine, "invoice_lines") <= 300  # past beat's next tick, no longer than asked
    the_pause_is_over(engine, "invoice_lines")
    assert fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC)).fetched == [invoice]


def test_lines_stripe_refuses_to_list_are_asked_for_again_an_hour_later(client, engine, runtime, accounts,
                                                                         stripe_fake, celery_app):
    _, customer = accounts.create()
    invoice = first_lines_failed(client, customer)["data"]["object"]["id"]  # none at the fake: a 404
    now = datetime.now(UTC)
    refused = fetch_incomplete_lines(runtime, celery_app, now)
    assert (refused.asked, refused.errors) == (1, 1)
    assert fetch_incomplete_lines(runtime, celery_app, now).asked == 0
    stripe_fake.set_lines(invoice, WHOLE)
    from app.payments.invoice_lines import REFUSED_AGAIN

    assert fetch_incomplete_lines(runtime, celery_app, now + REFUSED_AGAIN).fetched == [invoice]


def test_nothing_is_asked_without_a_stripe_key(client, engine, runtime, accounts, stripe_fake, celery_app,
                                               monkeypatch):
    from tasks import payments  # noqa: F401  registers the task with the app

    account, customer = accounts.create()
    invoice = first_lines_failed(client, customer)["data"]["object"]["id"]
    stripe_fake.set_lines(invoice, WHOLE)
    monkeypatch.setattr(runtime, "settings", runtime.settings.with_overrides(stripe_api_key=""))
    assert celery_app.tasks["tasks.fetch_invoice_lines"].apply().get() == {
        "skipped": "STRIPE_API_KEY is not set", DEFERRED: True}
    assert stripe_fake.calls == []
    assert mirrored(engine, invoice) == (["prod_core"], True)
    assert len(incomplete_reasons(recompute(engine, runtime, account))) == 1


def test_an_invoice_the_previous_release_mirrored_is_marked_by_its_next_event(client, engine, runtime, accounts,
                                                                              stripe_fake, celery_app):
    """A row written without lines_incomplete (by the previous release, still running while the
    migration runs, or by a writer whose source event the backfill cannot read): whether its lines
    are whole is not known, so the next event carrying the first lines only marks it incomplete and
    beat fetches the whole list. Counted as whole, the row kept its first page for good: the product
    on a later line never got its consequences."""
    account, customer = accounts.create()
    invoice = unique("in")
    t = int(time.time() - DAYS_AGO * 86400)
    with engine.begin() as conn:  # as the previous release's upsert wrote it: its event's first line
        conn.exec_driver_sql(
            "INSERT INTO stripe_invoice (id, stripe_customer_id, status, billing_reason, amount_due, "
            "amount_remaining, lines, created, source_created, source_rank, source_event_id) "
            "VALUES (%(i)s, %(c)s, 'open', 'subscription_cycle', 7000, 7000, "
            "'[{\"product\": \"prod_core\", \"amount\": 50, \"item\": null}]', to_timestamp(%(t)s), %(t)s, 1, "
            "'evt_previous_release')", {"i": invoice, "c": customer, "t": t - 60})
    first_lines_failed(client, customer, invoice=invoice, created=t)
    assert mirrored(engine, invoice) == (["prod_core"], True)
    stripe_fake.set_lines(invoice, WHOLE)
    assert fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC)).fetched == [invoice]
    assert products(recompute(engine, runtime, account))["prod_premium"] == "revoked"


def test_the_beat_store_and_a_webhook_of_the_invoice_at_the_same_moment_do_not_deadlock(
        client, engine, runtime, accounts, stripe_fake, celery_app):
    """Webhook ingest locks the account's recompute request and then the invoice's mirror row (as
    every writer of both does: pay.py, bad_debt_settle.py). Beat's pass storing the whole list
    locked them the other way round (the invoice, then the request): a webhook of the invoice's
    account arriving meanwhile deadlocked with it, and PostgreSQL aborted one of them."""
    from tests.integration.lock_order import pass_during_a_webhook
    from webhooks.mirror import extract

    account, customer = accounts.create()
    first = first_lines_failed(client, customer)
    invoice = first["data"]["object"]["id"]
    stripe_fake.set_lines(invoice, WHOLE)
    again = retried(first, customer, has_more=True)
    rows = [r for r in extract(with_product(again, "prod_core", 50)).rows if r.table == "stripe_invoice"]
    errors = pass_during_a_webhook(engine, account, again["id"], rows,
                                   lambda: fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC)))
    assert not errors, errors
    assert mirrored(engine, invoice) == ([p for p, _ in WHOLE], False)


def test_an_upgrade_whose_credit_lines_are_not_known_yet_withholds_nothing_the_customer_may_have_held(
        client, engine, runtime, accounts, stripe_fake, celery_app):
    """An unpaid upgrade withholds what it added only: a product it also credits (Stripe's proration
    credit for the unused time of what the subscription held) was the customer's before. Its event
    carried the first lines only, the charge for more seats of prod_seats, and its credit is on a
    later line: until the whole list is known the product cannot be told from an add-on, and it
    was withheld (a product the customer held before, taken away by an unpaid upgrade)."""
    account, customer = accounts.create()
    t = int(time.time() - DAYS_AGO * 86400)
    evt = event("invoice.payment_failed", id=unique("in"), customer=customer, created=t, amount_due=7000,
                amount_remaining=7000, amount_paid=0, attempt_count=1, billing_reason="subscription_update",
                paths={"created": t - 86400, "lines.has_more": True})
    assert post_event(client, with_product(evt, "prod_seats", 9000)).status_code == 200
    invoice = evt["data"]["object"]["id"]
    before = recompute(engine, runtime, account)
    assert before["level"] != "none" and len(incomplete_reasons(before)) == 1
    assert products(before)["prod_seats"] == "full"

    stripe_fake.set_lines(invoice, [("prod_seats", 9000), ("prod_seats", -2000)])
    assert fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC)).fetched == [invoice]
    after = recompute(engine, runtime, account)
    assert products(after)["prod_seats"] == "full" and incomplete_reasons(after) == []


def lines_fetched_metric(outcome: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("dunning_invoice_lines_fetched_total", {"outcome": outcome}) or 0.0


def test_an_invoice_whose_lines_cannot_be_read_costs_that_invoice_only(client, engine, runtime, accounts,
                                                                       stripe_fake, celery_app, caplog):
    """Stripe answered 200 with a line the mirror cannot read (an amount out of range). The error was
    not Stripe's, so it failed the whole pass; the invoice sorted first again next tick, and the
    invoices behind it were never fetched. Now it costs that invoice only: logged, asked again in a
    later pass, the others fetched."""
    ids = sorted(unique("in") for _ in range(2))
    bad, good = ids  # the bad one first, as the pass takes them
    for invoice in ids:
        _, customer = accounts.create()
        first_lines_failed(client, customer, invoice=invoice)
        stripe_fake.set_lines(invoice, WHOLE)
    stripe_fake.lines_by_invoice[bad][-1]["amount"] = float("nan")  # answered as NaN, read as nan

    report = fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC))
    assert (report.asked, report.fetched, report.errors) == (2, [good], 1)
    assert mirrored(engine, bad) == (["prod_core"], True)
    assert mirrored(engine, good) == ([p for p, _ in WHOLE], False)
    assert any(bad in r.getMessage() and "the pass goes on" in r.getMessage() for r in caplog.records)
    # Asked again later, the same way.
    again = fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC))
    assert (again.asked, again.fetched, again.errors) == (1, [], 1)


def test_an_invoice_stripe_keeps_failing_for_does_not_starve_the_others(client, engine, runtime, accounts,
                                                                        stripe_fake, celery_app):
    """A 5xx for one invoice left nothing noted, so it sorted first again every pass: with ``limit``
    such invoices no other one was ever asked. Every ask is noted now and the least recently asked
    go first, an invoice never asked before any; a 5xx is still asked again at the next pass."""
    ids = sorted(unique("in") for _ in range(3))
    failing, waiting, new = ids
    for invoice in (failing, waiting):
        _, customer = accounts.create()
        first_lines_failed(client, customer, invoice=invoice)
        stripe_fake.set_lines(invoice, WHOLE)
    stripe_fake.invoice_lines_down_for.add(failing)

    first = fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC), limit=1)
    assert (first.asked, first.fetched, first.errors) == (1, [], 1)
    assert fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC), limit=1).fetched == [waiting]

    _, customer = accounts.create()  # a new one is asked before the one asked already
    first_lines_failed(client, customer, invoice=new)
    stripe_fake.set_lines(new, WHOLE)
    assert fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC), limit=1).fetched == [new]
    # The failing one is not held back an hour: asked again at the next pass.
    retried = fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC), limit=1)
    assert (retried.asked, retried.errors) == (1, 1)
    stripe_fake.invoice_lines_down_for.clear()
    assert fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC), limit=1).fetched == [failing]


def test_lines_another_writer_stored_first_are_not_counted_as_fetched(client, engine, runtime, accounts,
                                                                      stripe_fake, celery_app):
    """While the pass asked Stripe, the invoice's event carrying its whole list (no has_more) came in:
    STORE writes nothing then, and the pass counted the invoice fetched all the same."""
    _, customer = accounts.create()
    first = first_lines_failed(client, customer)
    invoice = first["data"]["object"]["id"]
    stripe_fake.set_lines(invoice, WHOLE)
    whole = retried(first, customer)
    whole = with_product(whole, "prod_premium", 2000)
    posted: list[int] = []

    def the_whole_list_arrives_meanwhile(method: str, path: str) -> None:
        if not posted and path.split("?")[0].endswith(f"/{invoice}/lines"):
            posted.append(post_event(client, whole).status_code)

    stripe_fake.on_request = the_whole_list_arrives_meanwhile
    fetched_before = lines_fetched_metric("fetched")
    report = fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC))
    assert posted == [200]
    assert (report.asked, report.fetched, report.errors) == (1, [], 0)
    assert report.to_json()["fetched"] == 0
    assert lines_fetched_metric("fetched") == fetched_before
    assert mirrored(engine, invoice) == (["prod_premium"], False)


def test_an_upgrade_whose_lines_are_not_all_known_does_not_pass_on_a_dropped_products_access(
        client, engine, runtime, accounts, stripe_fake, celery_app):
    """An unpaid swap keeps what the customer held before it and no more: a product that replaced one
    the upgrade credits and no longer charges takes that product's access (entitlements' second
    loop). Told from the first lines only, a product the upgrade also credits on a later line (held
    before: more seats of both) looked like the replacement of one credited on the first: it took
    that product's access from another unpaid invoice (read-only at limited), a product the
    customer held before taken away while the lines were not known (55107a2 withholds nothing then)."""
    import copy

    account, customer = accounts.create()
    days = 15  # limited: a core product read-only
    t = int(time.time() - days * 86400)
    renewal = event("invoice.payment_failed", id=unique("in"), customer=customer, created=t, amount_due=7000,
                    amount_remaining=7000, amount_paid=0, attempt_count=1, billing_reason="subscription_cycle",
                    paths={"created": t - 86400})
    assert post_event(client, with_product(renewal, "prod_core", 7000)).status_code == 200
    upgrade = event("invoice.payment_failed", id=unique("in"), customer=customer, created=t, amount_due=1500,
                    amount_remaining=1500, amount_paid=0, attempt_count=1, billing_reason="subscription_update",
                    paths={"created": t - 86400, "lines.has_more": True})
    upgrade = with_product(upgrade, "prod_core", -1000)  # the first lines: a credit for prod_core...
    lines = upgrade["data"]["object"]["lines"]["data"]
    charge = copy.deepcopy(lines[0])  # ... and a charge for prod_seats, on an item of its own
    charge.update(id=unique("il"), amount=3000, pricing={"type": "price_details", "unit_amount_decimal": None,
                                                         "price_details": {"price": "price_prod_seats",
                                                                           "product": "prod_seats"}})
    charge["parent"]["subscription_item_details"]["subscription_item"] = unique("si")
    lines[:] = [lines[0], charge]
    assert post_event(client, upgrade).status_code == 200
    invoice = upgrade["data"]["object"]["id"]

    before = recompute(engine, runtime, account)
    assert before["level"] == "limited" and len(incomplete_reasons(before)) == 1
    assert products(before)["prod_core"] == "read_only"
    assert products(before)["prod_seats"] == "full"

    # The whole list: more seats of both products (each credited and charged), nothing swapped.
    stripe_fake.set_lines(invoice, [("prod_core", -1000), ("prod_seats", 3000), ("prod_seats", -2000),
                                    ("prod_core", 1500)])
    assert fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC)).fetched == [invoice]
    after = recompute(engine, runtime, account)
    assert products(after)["prod_seats"] == "full" and products(after)["prod_core"] == "read_only"


def test_the_tasks_time_running_out_ends_the_pass_and_blames_no_invoice(client, engine, runtime, accounts,
                                                                        stripe_fake, celery_app, monkeypatch):
    """Celery's soft time limit strikes inside a Stripe call (a slow Stripe): the task's time is up,
    not the invoice's fault. It was caught as an error about that invoice (logged at ERROR, counted,
    the pass going on past the limit toward the hard kill); it ends the pass, and the invoice is
    fetched by the next one."""
    from celery.exceptions import SoftTimeLimitExceeded

    import app.payments.invoice_lines as invoice_lines

    _, customer = accounts.create()
    invoice = first_lines_failed(client, customer)["data"]["object"]["id"]
    stripe_fake.set_lines(invoice, WHOLE)
    ask = invoice_lines.all_lines

    def time_is_up(*args: Any) -> Any:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(invoice_lines, "all_lines", time_is_up)
    with pytest.raises(SoftTimeLimitExceeded):
        fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC))
    monkeypatch.setattr(invoice_lines, "all_lines", ask)
    assert fetch_incomplete_lines(runtime, celery_app, datetime.now(UTC)).fetched == [invoice]
