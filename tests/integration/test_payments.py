"""Payment retries: beat dispatches due rows, retry_payment charges each attempt once through the
official stripe client (against a fake Stripe API server), the outcome comes back by recompute."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from app.domain.retry_cadence import REFUSED_BACKOFF
from app.payments.pay import retry_payment
from app.payments.retries import claim_due, expire_unsent
from app.payments.stripe_client import make_stripe_client
from app.recompute.service import run_recompute
from tests.conftest import post_event, wait_for
from tests.fakes import fake_stripe as stripe_outcomes
from tests.integration.dunning_setup import (
    dunning_row,
    failed_invoice,
    method_attached,
    paid,
    recompute_pending,
    retries,
)
from tests.stripe_events import event

pytestmark = pytest.mark.worker


def dispatch(celery_app) -> None:
    celery_app.send_task("tasks.dispatch_due_retries")


def test_a_due_retry_is_charged_once_with_a_key_per_attempt(client, accounts, engine, worker, celery_app,
                                                             fake_stripe):
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    state = dunning_row(engine, account)
    assert state["failure_class"] == "transient"
    assert state["retry_invoice_id"] == invoice and state["next_retry_at"] <= datetime.now(UTC)

    dispatch(celery_app)
    wait_for(lambda: [r["state"] for r in retries(engine, account)] == ["sent"], message="retry sent")
    (row,) = retries(engine, account)
    key = f"retry:{invoice}:{int(state['next_retry_at'].timestamp())}"
    assert row["idempotency_key"] == key and row["retry_number"] == 1 and not row["free"]
    (request,) = fake_stripe.pay_requests(invoice)
    assert request.idempotency_key == key

    # The outcome comes by webhook; meanwhile the recompute that follows the send records the retry
    # as in flight, so the decision stops saying "due" and the dispatcher stops selecting it.
    after = wait_for(lambda: (s := dunning_row(engine, account))["next_retry_at"] is None and s,
                     message="retry in flight")
    assert any(r["rule"] == "retry.in_flight" for r in after["reasons"])
    # Dispatching again, and the same message delivered again, charge nothing more.
    dispatch(celery_app)
    celery_app.send_task("tasks.retry_payment", [row["id"]])
    celery_app.send_task("tasks.retry_payment", [row["id"]])
    done = celery_app.send_task("tasks.retry_payment", [row["id"]])
    assert done.get(timeout=20)["outcome"] == "done"
    assert len(retries(engine, account)) == 1
    assert len(fake_stripe.pay_requests(invoice)) == 1


def test_two_dispatchers_and_two_workers_never_charge_one_attempt_twice(client, accounts, engine, worker,
                                                                        runtime, fake_stripe):
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    now = datetime.now(UTC)
    barrier = threading.Barrier(2)
    claimed: list[list[int]] = []

    def claim() -> None:
        barrier.wait()
        claimed.append(claim_due(engine, now))

    threads = [threading.Thread(target=claim) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for batch in claimed for i in batch if i in [r["id"] for r in retries(engine, account)]]
    assert len(ids) == 1, claimed

    # Two workers run the same retry at the same moment. Stripe holds the charge of whichever got
    # there first until the other has its answer: with a merely slow answer, a thread scheduled late
    # on a loaded machine came after the charge had ended and heard "done", not "busy".
    fake_stripe.script(stripe_outcomes.hold())
    client_ = make_stripe_client(runtime.settings)
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def charge() -> None:
        barrier.wait()
        outcomes.append(retry_payment(engine, client_, ids[0], datetime.now(UTC)).outcome)

    threads = [threading.Thread(target=charge) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: outcomes, message="the worker that did not get to charge to answer")
        assert outcomes == ["busy"] and len(fake_stripe.pay_requests(invoice)) == 1  # the other is in Stripe
    finally:
        fake_stripe.release()
        for t in threads:
            t.join()
    assert sorted(outcomes) == ["busy", "sent"]
    assert len(fake_stripe.pay_requests(invoice)) == 1
    assert fake_stripe.charges == [(invoice, retries(engine, account)[0]["idempotency_key"])]


def test_a_retry_no_longer_due_does_nothing(client, accounts, engine, worker, celery_app, fake_stripe):
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    (retry_id,) = claim_due(engine, datetime.now(UTC))  # dispatched, but its message waits in a queue...
    paid(client, engine, account, customer, invoice)  # ...while the customer pays

    result = celery_app.send_task("tasks.retry_payment", [retry_id]).get(timeout=20)
    assert result["outcome"] == "skipped" and "invoice is paid" in result["detail"]
    assert [r["state"] for r in retries(engine, account)] == ["skipped"]
    assert fake_stripe.pay_requests() == []
    assert dunning_row(engine, account)["next_retry_at"] is None


def test_a_retry_is_not_charged_while_a_bad_debt_payment_of_the_account_is_in_flight(client, accounts, engine,
                                                                                      worker, celery_app, fake_stripe):
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    with engine.begin() as conn:  # the customer pays the bad debt meanwhile (its balance counts this invoice)
        conn.exec_driver_sql("INSERT INTO bad_debt_payment (account_id, idempotency_key, request_fingerprint, amount) "
                             "VALUES (%(a)s, 'k1', 'f1', 5000)", {"a": account})
    result = celery_app.send_task("tasks.retry_payment", [retry_id]).get(timeout=20)
    assert result["outcome"] == "skipped" and "bad-debt payment" in result["detail"]
    assert fake_stripe.pay_requests(invoice) == []


def test_a_card_decline_is_an_outcome_and_the_account_is_recomputed(client, accounts, engine, worker, celery_app,
                                                                    fake_stripe):
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    version = dunning_row(engine, account)["version"]
    fake_stripe.script(stripe_outcomes.decline("insufficient_funds"))
    dispatch(celery_app)
    wait_for(lambda: [r["state"] for r in retries(engine, account)] == ["failed"], message="retry failed")
    assert "insufficient_funds" in retries(engine, account)[0]["error"]
    # The recompute that followed: the retry is used, the next one is planned on the schedule.
    state = wait_for(lambda: (d := dunning_row(engine, account))["version"] > version and d["retries_used"] == 1
                     and d, message="recompute after the decline")
    assert state["retry_invoice_id"] == invoice
    assert state["next_retry_at"] > datetime.now(UTC) + timedelta(hours=12)
    assert len(fake_stripe.pay_requests(invoice)) == 1


def test_a_retry_the_issuer_wants_authenticated_is_an_attempt_not_a_refusal(client, accounts, engine, worker,
                                                                            celery_app, fake_stripe):
    """Paying an invoice whose issuer asks for 3-D Secure answers 400 invoice_payment_intent_requires_action
    (an invalid_request_error, not a card error), yet Stripe made the attempt: the retry is spent and
    the account recomputed, with no refused backoff and no failed task for an operator. The invoice's
    payment_intent.requires_action webhook then stops the retries (tests/integration/test_attempt_detail.py)."""
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    version = dunning_row(engine, account)["version"]
    fake_stripe.script(stripe_outcomes.requires_action())
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    result = celery_app.send_task("tasks.retry_payment", [retry_id]).get(timeout=20)
    assert result["outcome"] == "failed"
    (row,) = retries(engine, account)
    assert row["state"] == "failed" and "invoice_payment_intent_requires_action" in row["error"]
    state = wait_for(lambda: (d := dunning_row(engine, account))["version"] > version and d["retries_used"] == 1
                     and d, message="recompute after the attempt")
    assert not any(r["rule"] == "retry.refused_backoff" for r in state["reasons"])
    assert fake_stripe.charges == [(invoice, row["idempotency_key"])]


def test_a_new_payment_method_after_a_permanent_decline_is_retried_at_once(client, accounts, engine, worker,
                                                                         celery_app, fake_stripe):
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "expired_card", days_ago=2)
    state = dunning_row(engine, account)
    assert state["failure_class"] == "permanent" and state["next_retry_at"] is None
    version = state["version"]

    pm = method_attached(client, customer)
    state = wait_for(lambda: (d := dunning_row(engine, account))["version"] > version and d, message="new method")
    assert state["retry_free"] is True and state["retry_payment_method_id"] == pm
    assert abs((state["next_retry_at"] - datetime.now(UTC)).total_seconds()) < 120

    dispatch(celery_app)
    wait_for(lambda: [r["state"] for r in retries(engine, account)] == ["sent"], message="free retry sent")
    (request,) = fake_stripe.pay_requests(invoice)
    assert request.params["payment_method"] == [pm]
    assert request.idempotency_key is not None and request.idempotency_key.startswith(f"free:{invoice}:{pm}:")
    assert retries(engine, account)[0]["free"] is True


def test_a_retry_claimed_before_the_customer_changed_cards_is_not_charged_to_the_old_card(
        client, accounts, engine, worker, celery_app, fake_stripe):
    """Beat claimed a retry on the card that failed; its message waits in the queue; meanwhile the
    customer makes a new card the default. The queued retry must not charge the card the customer
    replaced: it is skipped, and the new card gets its immediate free retry (DESIGN section 4)."""
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    version = dunning_row(engine, account)["version"]
    new_card = method_attached(client, customer)
    updated = event("customer.updated", id=customer, paths={"invoice_settings.default_payment_method": new_card})
    updated["data"]["previous_attributes"] = {"invoice_settings": {"default_payment_method": None}}
    assert post_event(client, updated).status_code == 200
    wait_for(lambda: dunning_row(engine, account)["version"] > version, message="card change recomputed")

    done = celery_app.send_task("tasks.retry_payment", [retry_id]).get(timeout=20)
    assert done["outcome"] == "skipped" and "default payment method is another one" in done["detail"]
    assert fake_stripe.pay_requests(invoice) == []
    state = wait_for(lambda: (d := dunning_row(engine, account))["retry_free"] and d, message="free retry planned")
    assert state["retry_payment_method_id"] == new_card

    dispatch(celery_app)
    wait_for(lambda: any(r["free"] and r["state"] == "sent" for r in retries(engine, account)),
             message="free retry sent")
    (request,) = fake_stripe.pay_requests(invoice)
    assert request.params["payment_method"] == [new_card]


def test_a_card_change_made_before_the_claim_but_heard_of_after_it_does_not_charge_the_old_card(
        client, accounts, engine, worker, celery_app, fake_stripe):
    """The customer changed cards at Stripe 20 s before beat claimed the retry planned on the old
    card; the change's webhook came after the claim, stamped with the moment of the change. The
    replaced card is not charged all the same: the claim names another card than the default."""
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    changed_at_stripe = int(time.time()) - 20
    version = dunning_row(engine, account)["version"]
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    new_card = method_attached(client, customer, created=changed_at_stripe - 5)
    updated = event("customer.updated", id=customer, created=changed_at_stripe,
                    paths={"invoice_settings.default_payment_method": new_card})
    updated["data"]["previous_attributes"] = {"invoice_settings": {"default_payment_method": None}}
    assert post_event(client, updated).status_code == 200
    wait_for(lambda: dunning_row(engine, account)["version"] > version, message="card change recomputed")

    done = celery_app.send_task("tasks.retry_payment", [retry_id]).get(timeout=20)
    assert done["outcome"] == "skipped", done
    assert fake_stripe.pay_requests(invoice) == []


def a_claimed_before_b(client, accounts, engine) -> tuple[str, str, int, datetime]:
    """Two accounts with a retry due, A's earlier: A's is claimed, the one slot of a tick. (A, B, the
    id of A's retry, the moment.)"""
    a, a_customer = accounts.create()
    failed_invoice(client, engine, a, a_customer, "insufficient_funds", days_ago=2)
    b, b_customer = accounts.create()
    failed_invoice(client, engine, b, b_customer, "insufficient_funds", days_ago=1.5)  # due later than A
    now = datetime.now(UTC)
    (a_retry,) = claim_due(engine, now, limit=1)
    return a, b, a_retry, now


def test_a_refused_retry_is_replanned_after_the_backoff_and_holds_back_no_other_account(
        client, accounts, engine, worker, celery_app, fake_stripe):
    """Stripe refuses A's retry unsent (a revoked key, say). The account is recomputed at once: its
    next retry waits the refused backoff under a new key, and meanwhile A no longer sits at the head
    of the due query (the dispatcher takes the earliest due first, a limited number per tick)."""
    a, b, a_retry, now = a_claimed_before_b(client, accounts, engine)
    fake_stripe.script(stripe_outcomes.invalid())
    version = dunning_row(engine, a)["version"]
    with pytest.raises(Exception, match="Stripe refused the request"):
        celery_app.send_task("tasks.retry_payment", [a_retry]).get(timeout=20)
    (refused,) = retries(engine, a)
    assert refused["state"] == "refused"

    state = wait_for(lambda: (d := dunning_row(engine, a))["version"] > version and d, message="recomputed")
    assert state["next_retry_at"] == refused["created_at"] + REFUSED_BACKOFF
    assert any(r["rule"] == "retry.refused_backoff" for r in state["reasons"])
    (b_retry,) = claim_due(engine, now, limit=1)  # A no longer holds the one slot
    assert [r["id"] for r in retries(engine, b)] == [b_retry]

    later = refused["created_at"] + REFUSED_BACKOFF + timedelta(minutes=1)
    claimed = claim_due(engine, later)
    again = [r for r in retries(engine, a) if r["id"] in claimed]
    assert len(again) == 1 and again[0]["idempotency_key"] != refused["idempotency_key"]


def test_a_refused_retry_commits_its_recompute_request_with_the_refusal(client, accounts, engine, worker, runtime,
                                                                         fake_stripe):
    """The refusal and the account's recompute request are one transaction: if the message is lost
    (the broker down), beat re-drives the request."""
    account, customer = accounts.create()
    failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    fake_stripe.script(stripe_outcomes.invalid())
    result = retry_payment(engine, make_stripe_client(runtime.settings), retry_id, datetime.now(UTC))
    assert result.outcome == "refused" and result.recompute and "InvalidRequestError" in (result.detail or "")
    assert [r["state"] for r in retries(engine, account)] == ["refused"]
    with engine.connect() as conn:
        requested = conn.exec_driver_sql("SELECT cause FROM recompute_request WHERE account_id = %(a)s",
                                         {"a": account}).scalar()
    assert requested == f"retry:{retry_id}:refused"


def test_a_retry_of_an_invoice_paid_meanwhile_is_skipped_and_leaves_no_work_for_an_operator(
        client, accounts, engine, worker, celery_app, fake_stripe):
    """The customer paid on Stripe's hosted page after beat claimed a retry and before the paid
    webhook came: Stripe refuses the retry (invoice_not_open). That is the dunning's success, not a
    refusal: the invoice is mirrored paid as Stripe has it, the account recomputed, the retry skipped,
    and no stuck work is left for an operator (a refusal is dead work)."""
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    (retry_id,) = claim_due(engine, datetime.now(UTC))
    fake_stripe.paid_elsewhere(invoice, customer, 5000)

    done = celery_app.send_task("tasks.retry_payment", [retry_id]).get(timeout=20)
    assert (done["outcome"], done["detail"]) == ("skipped", "not due: invoice paid at Stripe when charged")
    (row,) = retries(engine, account)
    assert row["state"] == "skipped"
    state = wait_for(lambda: (d := dunning_row(engine, account))["status"] == "current" and d,
                     message="recomputed with the invoice paid")
    assert state["next_retry_at"] is None
    with engine.connect() as conn:
        stuck = conn.exec_driver_sql("SELECT count(*) FROM subs_stuck_events WHERE account_id = %(a)s",
                                     {"a": account}).scalar()
    assert stuck == 0
    assert claim_due(engine, datetime.now(UTC)) == []  # nothing re-armed
    assert len(fake_stripe.pay_requests(invoice)) == 1


def test_a_claimed_retry_never_sent_within_the_guard_window_is_skipped_replanned_and_sent(
        client, accounts, engine, worker, celery_app, fake_stripe):
    """Beat claimed a retry and its message never reached a worker (the broker went down right after
    the claim, for longer than the guard window). Nothing was charged, so the row stops counting as
    a used retry: it is skipped, the account recomputed, and the same attempt re-armed and sent."""
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    planned = dunning_row(engine, account)
    (retry_id,) = claim_due(engine, datetime.now(UTC))  # its message is lost
    with engine.begin() as conn:  # the claim was made 35 minutes ago (the guard window is 30)
        conn.exec_driver_sql("UPDATE payment_retry SET created_at = created_at - interval '35 minutes', "
                             "updated_at = updated_at - interval '35 minutes' WHERE id = %(id)s", {"id": retry_id})
    assert claim_due(engine, datetime.now(UTC)) == []  # too old to send again as it was

    dispatch(celery_app)  # skips it and requests the account's recompute, which nothing is claimed before
    wait_for(lambda: [r["state"] for r in retries(engine, account)] == ["skipped"]
             and not recompute_pending(engine, account), message="skipped and recomputed")
    dispatch(celery_app)
    (row,) = wait_for(lambda: [r for r in retries(engine, account) if r["state"] == "sent"], message="retry sent")
    assert row["id"] == retry_id and row["retry_number"] == 1
    assert row["idempotency_key"] == f"retry:{invoice}:{int(planned['next_retry_at'].timestamp())}"
    assert len(fake_stripe.pay_requests(invoice)) == 1
    state = wait_for(lambda: (d := dunning_row(engine, account))["next_retry_at"] is None and d,
                     message="the retry sent is in flight")
    assert state["retries_used"] == 1  # the one sent, not also the one never sent


def test_a_retry_never_sent_no_longer_counts_as_used(client, accounts, engine, worker, runtime):
    """Until it is skipped, a claimed row counts as an attempt made; once skipped, compute plans the
    same attempt again, with none of the budget used."""
    account, customer = accounts.create()
    failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    planned = dunning_row(engine, account)
    t0 = datetime.now(UTC)
    (retry_id,) = claim_due(engine, t0)
    later = t0 + timedelta(minutes=35)
    assert expire_unsent(engine, later - timedelta(minutes=10)) == []  # within the guard window: left alone
    assert expire_unsent(engine, later) == [account]
    assert [(r["state"], r["error"]) for r in retries(engine, account)] == [
        ("skipped", "never sent within the guard window; compute plans afresh")]
    assert expire_unsent(engine, later) == []

    run_recompute(engine, runtime.policy, account, "STATE_REFRESH", later)
    state = dunning_row(engine, account)
    assert (state["retries_used"], state["next_retry_at"]) == (0, planned["next_retry_at"])
    assert claim_due(engine, later) == [retry_id]  # the same attempt, re-armed under its key


def test_an_attempt_already_charged_holds_back_no_other_account_until_its_recompute(client, accounts, engine,
                                                                                     worker, runtime, fake_stripe):
    """Until A's recompute runs (a backlog, its message lost) A's stored decision still says "due"
    under the key of an attempt already made, which dispatch never claims again: the due query
    passes over it, so the limited slots of a tick go to accounts that can be claimed."""
    a, b, a_retry, now = a_claimed_before_b(client, accounts, engine)
    # Charged outside the task: no recompute follows.
    assert retry_payment(engine, make_stripe_client(runtime.settings), a_retry, now).outcome == "sent"
    assert dunning_row(engine, a)["next_retry_at"] <= now

    (b_retry,) = claim_due(engine, now, limit=1)
    assert [r["id"] for r in retries(engine, b)] == [b_retry]
    assert [r["id"] for r in retries(engine, a)] == [a_retry]


def test_without_a_stripe_key_due_retries_stay_planned_and_nothing_asks_stripe(
        client, accounts, engine, worker, celery_app, runtime, fake_stripe, monkeypatch):
    """make run's default has no STRIPE_API_KEY: a due retry asked Stripe with an empty key, failed
    as Stripe unreachable and was retried for hours. Now it waits, unclaimed, until a key is set."""
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=2)
    assert dunning_row(engine, account)["next_retry_at"] <= datetime.now(UTC)
    with_key = runtime.settings
    monkeypatch.setattr(runtime, "settings", with_key.with_overrides(stripe_api_key=""))
    dispatch_task = celery_app.tasks["tasks.dispatch_due_retries"]
    assert dispatch_task.apply().get() == {"claimed": 0, "sent": 0, "skipped": "STRIPE_API_KEY is not set",
                                         "deferred": True}
    assert retries(engine, account) == []
    (claimed,) = claim_due(engine, datetime.now(UTC))  # as if claimed and sent before the key was removed
    assert celery_app.tasks["tasks.retry_payment"].apply([claimed]).get()["outcome"] == "not_sent"
    assert fake_stripe.pay_requests(invoice) == []
    assert [r["state"] for r in retries(engine, account)] == ["dispatched"]  # left for the guard window's expiry

    monkeypatch.setattr(runtime, "settings", with_key)  # the key is set: the claimed retry goes out
    celery_app.tasks["tasks.retry_payment"].apply([claimed]).get()
    assert [r["state"] for r in retries(engine, account)] == ["sent"]
    assert len(fake_stripe.pay_requests(invoice)) == 1


@pytest.mark.parametrize("task_name, args", [
    ("tasks.retry_payment", {"retry_id": 2_000_000_001}),
    ("tasks.settle_bad_debt_payment", {"payment_id": 2_000_000_001}),
    ("tasks.reconcile_bad_debt_payment", {"payment_id": 2_000_000_001}),
])
def test_without_a_stripe_key_a_redriven_payment_task_leaves_its_stuck_row_for_when_the_key_is_set(
        accounts, engine, celery_app, runtime, monkeypatch, task_name, args):
    """A run that asked Stripe nothing did none of the stuck row's work: the retry (left charging
    by a connection error, say) must be sent again once a key is set. A re-drive without the key
    resolved the row, and nothing sent the retry again."""
    from app.stuck_work import task_id_for
    from tasks import bad_debt, payments, stuck  # noqa: F401  registers the tasks; a re-driven task's success resolves its row
    from tasks.failures import FailureKind, record_stuck

    account, _customer = accounts.create()
    assert record_stuck(engine, task_name, args, account, FailureKind.REMOTE_UNAVAILABLE, "Stripe unavailable", 5,
                        "retrying", per_args=True)
    with engine.connect() as conn:
        stuck_id = conn.exec_driver_sql("SELECT id FROM subs_stuck_events WHERE task_name = %(t)s "
                                        "AND account_id = %(a)s", {"t": task_name, "a": account}).scalar_one()
    monkeypatch.setattr(runtime, "settings", runtime.settings.with_overrides(stripe_api_key=""))
    result = celery_app.tasks[task_name].apply(kwargs=args, task_id=task_id_for(stuck_id)).get()
    assert result["outcome"] == "not_sent"
    with engine.connect() as conn:
        state = conn.exec_driver_sql("SELECT state FROM subs_stuck_events WHERE id = %(id)s",
                                     {"id": stuck_id}).scalar_one()
    assert state == "retrying"
