"""A backlog of entitlements sends the account's newest only: entitlements are sent whole, so an older
EntitlementsChanged still waiting when a newer one is next in line says nothing the newer one does not,
and sending it would put the account in a state it has already left. The case that matters: Account
Management was down while a customer was restricted and then paid; when it returns, the restriction
must not reach it (access withheld, a "restricted" notice sent) before the paid entitlements. Two
relays never send one account's rows side by side. A cancellation waits while the customer pays the
bad debt, and one superseded after a try without an answer says Account Management may have acted."""

from __future__ import annotations

from datetime import UTC, datetime

from psycopg2.extras import Json

from app.domain.events import CancellationRequested, DunningEntered, EntitlementsChanged, UpgradeRevertRequested
from app.outbox.relay import relay
from tests.integration.test_mirror_filing import invoice
from tests.integration.test_outbox_relay import (
    LATER,
    bad_debt_episode,
    outbox,
    plan_over_delivered_history,
    requesting,
    write_events,
)


def entitlements(engine, account: str, version: int, **products: str) -> None:
    write_events(engine, account, version, [EntitlementsChanged(entitlements={"products": products})])


def test_a_restriction_still_waiting_when_the_customer_paid_is_not_sent_before_the_paid_entitlements(
        accounts, engine, fake_am):
    account, _ = accounts.create()
    fake_am.mode = "failing"  # Account Management answers 503 while the customer is restricted
    entitlements(engine, account, 1, prod_core="restricted")
    assert relay(engine, fake_am.url).failed == 1
    write_events(engine, account, 2, [DunningEntered(unpaid_since=None, failure_class="soft")])  # no call
    entitlements(engine, account, 3, prod_core="full")  # the customer paid

    fake_am.mode = "up"
    report = relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)

    assert [r.body for r in fake_am.for_account(account)] == [
        {"entitlements": {"products": {"prod_core": "full"}}, "dunning_version": 3}]
    restricted, _, paid = outbox(engine, account)
    assert (restricted["state"], paid["state"]) == ("superseded", "delivered")
    assert "version 3" in restricted["last_error"] and restricted["attempts"] == 1  # tried once, while down
    assert (report.delivered, report.superseded) == (2, 1)  # the informational row is done with, as before


def test_a_backlog_of_entitlements_sends_one_call_in_the_end(accounts, engine, fake_am):
    account, _ = accounts.create()
    for version in (1, 2, 3, 4):
        entitlements(engine, account, version, prod_core=f"v{version}")
    relay(engine, fake_am.url)
    assert [r.body["dunning_version"] for r in fake_am.for_account(account)] == [4]
    assert [r["state"] for r in outbox(engine, account)] == ["superseded"] * 3 + ["delivered"]


def test_entitlements_ahead_of_a_lifecycle_request_are_still_sent_before_it(accounts, engine, fake_am):
    """Account Management acts on a cancellation with the entitlements it holds: the entitlements
    written before it go first, even with newer ones behind it (a cancellation refused would
    otherwise leave Account Management with entitlements older than both)."""
    account, _ = accounts.create()
    requesting(engine, account, "cancel:sub_1")
    episode = datetime.now(UTC).isoformat()
    bad_debt_episode(engine, account, episode)
    entitlements(engine, account, 1, prod_core="restricted")
    write_events(engine, account, 2, [CancellationRequested(subscription_id="sub_1", reason="x", episode=episode)])
    entitlements(engine, account, 3, prod_core="revoked")
    relay(engine, fake_am.url)
    assert [(r.kind, r.body.get("dunning_version")) for r in fake_am.for_account(account)] == [
        ("entitlements", 1), ("cancellations", None), ("entitlements", 3)]


def test_looking_for_the_next_call_reads_no_delivered_history(engine):
    from app.outbox.relay import NEXT_CALL_SQL

    plan = plan_over_delivered_history(engine, "acct_next_", 50, NEXT_CALL_SQL, {"account": "acct_next_1", "id": 1})
    assert "ix_outbox_pending" in plan and "Seq Scan" not in plan, plan


def test_a_second_relay_started_while_the_first_sends_leaves_the_account_to_it(accounts, engine, fake_am):
    """Two relay workers (the beat pass and tasks.deliver_account_outbox): while one waits on Account
    Management for an account's row, the other does not send that account's rows (it would send the
    next one beside, or before, the one in flight)."""
    import requests

    from app.outbox.relay import deliver_account

    account, _ = accounts.create()
    requesting(engine, account, "revert:in_up")
    entitlements(engine, account, 1, prod_core="restricted")
    write_events(engine, account, 2, [UpgradeRevertRequested(invoice_id="in_up", subscription_id="sub_1")])
    second: list = []

    def meanwhile(request) -> None:
        if not second:
            with requests.Session() as session:
                second.append(deliver_account(engine, session, fake_am.url, account))

    fake_am.before_answer = meanwhile
    first = relay(engine, fake_am.url)
    assert (second[0].skipped_locked, second[0].delivered) == (1, 0)
    assert first.delivered == 2
    assert [r.kind for r in fake_am.for_account(account)] == ["entitlements", "cancellations"]


def cancellation_in_bad_debt(engine, account: str) -> str:
    """The account in bad debt (an open episode) asks to cancel sub_1: its CancellationRequested (v1)
    waits in the outbox. The episode's start."""
    requesting(engine, account, "cancel:sub_1")
    episode = datetime.now(UTC).isoformat()
    bad_debt_episode(engine, account, episode)
    write_events(engine, account, 1, [CancellationRequested(subscription_id="sub_1", reason="x", episode=episode)])
    return episode


def pay_bad_debt(engine, account: str, invoices: list[str] | None = None) -> int:
    """A bad-debt payment in flight (POST /pay-bad-debt committed it and is charging the customer);
    the recompute that lifts the bad debt has not run yet."""
    with engine.begin() as conn:
        return conn.exec_driver_sql(
            "INSERT INTO bad_debt_payment (account_id, idempotency_key, request_fingerprint, amount, invoice_ids) "
            "VALUES (%(a)s, %(k)s, 'fp', 5000, %(i)s) RETURNING id",
            {"a": account, "k": f"key-{account}", "i": Json(invoices or [])}).scalar_one()


def test_a_cancellation_waits_while_another_accounts_payment_covers_an_invoice_the_account_owns_now(
        accounts, engine, fake_am):
    """Another team moved the customer here while the old account's bad-debt payment ran: the new
    account's cancellation (its state asked for it before the recompute that holds it) waits for that
    payment like for one of its own, and goes if it fails. A payment covering none of its invoices
    holds nothing."""
    old, _ = accounts.create()
    account, customer = accounts.create()
    bystander, _ = accounts.create()
    with engine.begin() as conn:
        invoice(conn, f"in_{account}", customer, subscription="sub_1")
    cancellation_in_bad_debt(engine, account)
    payment = pay_bad_debt(engine, old, [f"in_{account}"])
    pay_bad_debt(engine, bystander, ["in_someone_else"])

    report = relay(engine, fake_am.url)
    assert fake_am.for_account(account) == []  # a paying customer's subscription is not cancelled
    [cancel] = outbox(engine, account)
    assert cancel["attempts"] == 0 and f"bad-debt payment {payment} is in flight" in cancel["last_error"]
    assert report.held == 1

    with engine.begin() as conn:  # declined: the new account's cancellation goes
        conn.exec_driver_sql("UPDATE bad_debt_payment SET state = 'failed' WHERE id = %(id)s", {"id": payment})
    relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    assert [r.kind for r in fake_am.for_account(account)] == ["cancellations"]


def test_the_accounts_own_bad_debt_cancellation_goes_while_another_accounts_payment_covers_a_moved_customer(
        accounts, engine, fake_am):
    """The account was in bad debt for its own invoices before another team moved a customer here
    whose old account is paying that customer's invoices: that payment pays none of the account's
    own debt, so the cancellation of its own subscription goes, not held for the other payment's
    outcome (a bank debit takes days). A request for the moved customer's subscription still waits."""
    old, _ = accounts.create()
    account, own_customer = accounts.create()
    moved = f"cus_moved_{account}"
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO subs_customer (stripe_customer_id, account_id) VALUES (%(c)s, %(a)s)",
                             {"c": moved, "a": account})
        invoice(conn, f"in_own_{account}", own_customer, subscription="sub_own")
        invoice(conn, f"in_moved_{account}", moved, subscription="sub_moved")
    requesting(engine, account, "cancel:sub_own", "cancel:sub_moved")
    episode = datetime.now(UTC).isoformat()
    bad_debt_episode(engine, account, episode)
    write_events(engine, account, 1, [CancellationRequested(subscription_id="sub_own", reason="x", episode=episode),
                                      CancellationRequested(subscription_id="sub_moved", reason="x", episode=episode)])
    payment = pay_bad_debt(engine, old, [f"in_moved_{account}"])

    report = relay(engine, fake_am.url)
    assert [(r.kind, r.body["subscription_id"]) for r in fake_am.for_account(account)] == [
        ("cancellations", "sub_own")]
    [_, moved_cancel] = outbox(engine, account)
    assert f"bad-debt payment {payment} is in flight" in moved_cancel["last_error"]
    assert report.held == 1


def test_a_cancellation_waits_while_the_customer_pays_the_bad_debt_and_goes_if_the_payment_fails(
        accounts, engine, fake_am):
    account, _ = accounts.create()
    cancellation_in_bad_debt(engine, account)
    entitlements(engine, account, 2, prod_core="revoked")
    payment = pay_bad_debt(engine, account)

    before = datetime.now(UTC)
    report = relay(engine, fake_am.url)
    assert fake_am.for_account(account) == []  # a paying customer's subscription is not cancelled
    cancel, behind = outbox(engine, account)
    assert (cancel["state"], cancel["attempts"], cancel["blocked_at"]) == ("pending", 0, None)
    assert f"bad-debt payment {payment} is in flight" in cancel["last_error"]
    assert cancel["next_attempt_at"] > before and behind["attempts"] == 0  # in order, behind it
    assert (report.delivered, report.failed, report.held) == (0, 0, 1)

    with engine.begin() as conn:  # declined: the account stays in bad debt, its cancellation requested
        conn.exec_driver_sql("UPDATE bad_debt_payment SET state = 'failed' WHERE id = %(id)s", {"id": payment})
    relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    assert [r.kind for r in fake_am.for_account(account)] == ["cancellations", "entitlements"]


def test_an_upgrade_revert_waits_while_the_customer_pays_the_bad_debt_and_goes_if_the_payment_fails(
        accounts, engine, fake_am):
    """An account in bad debt with an unpaid upgrade run out asks for its revert beside the
    cancellation; the bad-debt payment covers the upgrade invoice too, and compute holds the revert
    while it is in flight (guard.revert_held). Sent in the window before that recompute, it took the
    upgrade away from a customer paying for it."""
    account, _ = accounts.create()
    requesting(engine, account, "revert:in_up")
    write_events(engine, account, 1, [UpgradeRevertRequested(invoice_id="in_up", subscription_id="sub_1")])
    payment = pay_bad_debt(engine, account)

    report = relay(engine, fake_am.url)
    assert fake_am.for_account(account) == []  # the paying customer keeps the upgrade
    (revert,) = outbox(engine, account)
    assert (revert["state"], revert["attempts"], revert["blocked_at"]) == ("pending", 0, None)
    assert f"bad-debt payment {payment} is in flight" in revert["last_error"]
    assert (report.delivered, report.failed, report.held) == (0, 0, 1)

    with engine.begin() as conn:  # declined: the revert is still requested and must still go
        conn.exec_driver_sql("UPDATE bad_debt_payment SET state = 'failed' WHERE id = %(id)s", {"id": payment})
    relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    assert [r.body["action"] for r in fake_am.for_account(account)] == ["revert_upgrade"]


def test_a_cancellation_no_longer_wanted_after_a_try_without_an_answer_says_it_may_have_gone(
        accounts, engine, fake_am, caplog):
    """The first try timed out or got a 5xx: Account Management may have cancelled the subscription.
    The customer pays and the request is superseded: the row and the log say it may have gone, so
    an operator can check the customer's subscription (before, the row said only 'no longer requested')."""
    import logging

    account, _ = accounts.create()
    cancellation_in_bad_debt(engine, account)
    fake_am.mode = "failing"
    assert relay(engine, fake_am.url).failed == 1
    requesting(engine, account)  # paid: the cancellation is no longer requested
    fake_am.mode = "up"
    with caplog.at_level(logging.INFO, logger="app.outbox.relay"):
        assert relay(engine, fake_am.url, now=datetime.now(UTC) + LATER).superseded == 1
    (row,) = outbox(engine, account)
    assert row["state"] == "superseded" and row["last_error"].startswith("superseded: cancel:sub_1 is no longer")
    assert "sent 1 time(s) before" in row["last_error"] and "HTTP 503" in row["last_error"]
    assert "may have acted on it" in row["last_error"]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "may have acted" in r.getMessage()]
    assert len(warned) == 1
    assert fake_am.for_account(account) == []


def test_a_cancellation_tried_without_an_answer_then_held_for_a_payment_keeps_its_last_answer(
        accounts, engine, fake_am):
    """The case 143d03e is for, through a hold: the cancellation timed out or got a 5xx, the customer
    pays, the relay holds it for the payment, and the recompute then takes it away. Superseded, it
    must still name the answer it got when sent; the hold wrote over it, and the row read only
    'the last: held: bad-debt payment N is in flight'."""
    account, _ = accounts.create()
    cancellation_in_bad_debt(engine, account)
    fake_am.mode = "failing"
    assert relay(engine, fake_am.url).failed == 1
    payment = pay_bad_debt(engine, account)
    fake_am.mode = "up"
    assert relay(engine, fake_am.url, now=datetime.now(UTC) + LATER).held == 1
    assert relay(engine, fake_am.url, now=datetime.now(UTC) + 2 * LATER).held == 1  # held twice: still one answer
    (row,) = outbox(engine, account)
    assert f"bad-debt payment {payment} is in flight" in row["last_error"] and row["attempts"] == 1
    assert row["last_error"].count("HTTP 503") == 1

    requesting(engine, account)  # the recompute after the payment: no longer requested
    assert relay(engine, fake_am.url, now=datetime.now(UTC) + 3 * LATER).superseded == 1
    (row,) = outbox(engine, account)
    assert "sent 1 time(s) before" in row["last_error"] and "HTTP 503" in row["last_error"]
    assert "may have acted on it" in row["last_error"]
    assert fake_am.for_account(account) == []


def test_a_cancellation_never_tried_or_refused_is_superseded_with_its_reason_alone(accounts, engine, fake_am):
    account, _ = accounts.create()
    episode = cancellation_in_bad_debt(engine, account)
    write_events(engine, account, 2, [CancellationRequested(subscription_id="sub_2", reason="x", episode=episode)])
    fake_am.refuse(account, 422, {"error": "subscription_not_cancellable"})
    assert relay(engine, fake_am.url).failed == 1  # refused as wrong: Account Management did nothing
    requesting(engine, account)
    relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    assert [r["last_error"] for r in outbox(engine, account)] == [
        "superseded: cancel:sub_1 is no longer requested", "superseded: cancel:sub_2 is no longer requested"]


def test_the_hold_reads_the_payments_in_flight_only_not_the_payment_history(accounts, engine):
    """Whether another account's payment in flight covers one of the account's invoices is asked for
    every lifecycle request the relay sends: ended payments, which accumulate for ever, are not read."""
    from app.outbox.relay import PAYMENT_IN_FLIGHT_SQL

    account, customer = accounts.create()
    with engine.begin() as conn:
        invoice(conn, f"in_{account}", customer)
        conn.exec_driver_sql(
            "INSERT INTO bad_debt_payment (account_id, idempotency_key, request_fingerprint, amount, state, "
            "invoice_ids) SELECT 'acct_hist_' || mod(g, 500), 'hist-' || g, 'fp', 5000, 'failed', "
            "       jsonb_build_array('in_hist_' || g) FROM generate_series(1, 20000) g")
    pay_bad_debt(engine, account, [f"in_{account}"])
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE bad_debt_payment")
            plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + PAYMENT_IN_FLIGHT_SQL,
                                                                {"account": account, "subscription": "sub_1",
                                                                 "invoice": None}))
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM bad_debt_payment WHERE idempotency_key LIKE %(k)s", {"k": "hist-%"})
    assert "Seq Scan on bad_debt_payment" not in plan, plan
