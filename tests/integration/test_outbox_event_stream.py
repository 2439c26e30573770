"""The outbox of one account through a whole dunning, event by event (DESIGN 5): what each change
emits and nothing else, the level events chaining from/to (one event per change, a jump of two
levels included), a redelivery and a no-op recompute emitting nothing, the bad-debt payment's
lifting and decline, and the exit with how and duration. Real webhooks from the fixtures, real
recomputes at chosen moments."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from app.recompute.service import run_recompute
from tests.conftest import Accounts, post_event
from tests.integration.bad_debt_setup import InBadDebt, intent_event, key, pay
from tests.integration.test_journeys_journeys import charge_failed, invoice_event
from tests.stripe_events import event, unique

DAY = 86400


def rows(engine: Any, account: str) -> list[tuple[int, int, str, dict[str, Any]]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(
            "SELECT id, dunning_version, event_type, payload FROM outbox WHERE account_id = %(a)s ORDER BY id",
            {"a": account})]


class Stream:
    """The account's outbox rows written since the last step."""

    def __init__(self, engine: Any, runtime: Any, account: str) -> None:
        self.engine, self.runtime, self.account, self.seen = engine, runtime, account, 0

    def step(self, at: datetime) -> list[tuple[str, dict[str, Any]]]:
        result = run_recompute(self.engine, self.runtime.policy, self.account, "MANUAL", at)
        new = rows(self.engine, self.account)[self.seen:]
        self.seen += len(new)
        if new:
            assert result.applied is not None
            assert {version for _, version, _, _ in new} == {result.applied.version}
        for _, version, _, payload in new:
            assert payload.pop("account_id") == self.account and payload.pop("dunning_version") == version
        return [(name, payload) for _, _, name, payload in new]


def test_a_whole_dunning_emits_each_outcome_once_in_version_order(client, engine, runtime, accounts: Accounts,
                                                                   stripe_fake):
    from app.payments.bad_debt_settle import settle

    account, customer = accounts.create()
    stream = Stream(engine, runtime, account)
    t0 = int(time.time()) - 25 * DAY
    at = lambda days: datetime.fromtimestamp(t0 + days * DAY, UTC)  # noqa: E731
    invoice, pm = unique("in"), unique("pm")
    assert post_event(client, event("customer.updated", id=customer, created=t0 - DAY,
                                    paths={"invoice_settings.default_payment_method": pm})).status_code == 200
    assert post_event(client, invoice_event("invoice.payment_failed", customer, invoice, t0)).status_code == 200
    charge = charge_failed(customer, t0 + 1, "insufficient_funds")
    assert post_event(client, charge).status_code == 200

    [entered, failed, escalated, entitled] = stream.step(at(0.5))
    assert entered[0] == "DunningEntered" and entered[1]["failure_class"] == "transient"
    assert failed == ("PaymentFailed", {"attempt_id": charge["data"]["object"]["payment_intent"],
                                        "failure_class": "transient"})
    assert escalated == ("ConsequenceEscalated", {"from_level": "none", "to_level": "notice"})
    assert entitled[0] == "EntitlementsChanged" and entitled[1]["entitlements"]["products"] == {"prod_core": "full"}

    # Nobody recomputed between day 0.5 and day 15: notice -> limited is one change, one event.
    assert stream.step(at(15)) == [
        ("ConsequenceEscalated", {"from_level": "notice", "to_level": "limited"}),
        ("EntitlementsChanged", {"entitlements": {"plan_changes": False, "products": {"prod_core": "read_only"}}})]
    assert post_event(client, charge).status_code == 200  # redelivered
    assert stream.step(at(15.1)) == []  # and a recompute with nothing new
    assert stream.step(at(15.2)) == []

    marked = invoice_event("invoice.marked_uncollectible", customer, invoice, t0 + 20 * DAY, created=t0 - 3600)
    assert post_event(client, marked).status_code == 200
    entry = at(20)
    [escalated, bad_debt, entitled, cancel] = stream.step(entry)
    assert escalated == ("ConsequenceEscalated", {"from_level": "limited", "to_level": "suspended"})
    assert bad_debt == ("BadDebtEntered", {"reason": "marked_uncollectible", "failure_class": "transient",
                                           "products": ["prod_core"]})
    assert entitled[1]["entitlements"] == {"plan_changes": False, "products": {"prod_core": "revoked"}}
    assert cancel[0] == "CancellationRequested" and cancel[1]["reason"] == "marked_uncollectible"
    assert cancel[1]["episode"] == entry.isoformat()

    debt = InBadDebt(account, customer, invoice, 5000, pm, marked["data"]["object"])
    stripe_fake.add_invoice(debt.invoice_object)
    now = datetime.now(UTC)
    first = pay(client, {"account_id": account, "amount": 5000}, key())
    assert first.status_code == 202, first.json
    [(lifting, _)] = stream.step(now + timedelta(minutes=1))
    assert lifting == "BadDebtLifting"  # no cancellation while the customer pays: the action is withdrawn
    declined = intent_event("failed", debt, first.json["stripe_payment_intent_id"], first.json["payment_id"],
                            decline="insufficient_funds")
    assert post_event(client, declined).status_code == 200
    # Back in bad debt: the same episode, no second BadDebtEntered; the same cancellation request again.
    assert stream.step(now + timedelta(minutes=2)) == [
        ("PaymentFailed", {"attempt_id": first.json["stripe_payment_intent_id"], "failure_class": "transient"}),
        ("CancellationRequested", cancel[1])]

    second = pay(client, {"account_id": account, "amount": 5000}, key())
    assert second.status_code == 202, second.json
    assert [name for name, _ in stream.step(now + timedelta(minutes=3))] == ["BadDebtLifting"]
    paid = intent_event("succeeded", debt, second.json["stripe_payment_intent_id"], second.json["payment_id"])
    assert post_event(client, paid).status_code == 200
    assert settle(runtime, int(second.json["payment_id"])).outcome == "settled"
    exit_at = now + timedelta(hours=5)
    assert stream.step(exit_at) == [
        ("ConsequenceEased", {"from_level": "suspended", "to_level": "none"}),
        ("BadDebtExited", {"how": "paid", "duration_seconds": int((exit_at - entry).total_seconds())}),
        ("DunningResolved", {"how": "paid"}),
        # The product paid for back in full (known from its invoice only: the mirror has no event of
        # the subscription), not left out of the entitlements sent whole.
        ("EntitlementsChanged", {"entitlements": {"plan_changes": True, "products": {"prod_core": "full"}}})]
    assert stream.step(exit_at + timedelta(minutes=1)) == []
    versions = [version for _, version, _, _ in rows(engine, account)]
    assert versions == sorted(versions)
