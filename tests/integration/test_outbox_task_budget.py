"""tasks.deliver_account_outbox keeps to the relay's time budget, as tasks.relay_outbox does: with a
slow Account Management it stops between rows once the budget is spent, and the rest waits, in order,
for the next pass. Before, it was given no deadline and went on until the task's own hard time limit
(minutes), holding an outbox worker the whole time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from freezegun import freeze_time

import tasks.outbox  # noqa: F401  (registers the task on the test's Celery app)
from app.domain.events import EntitlementsChanged, UpgradeRevertRequested
from tests.integration.test_outbox_relay import outbox, requesting, write_events


def test_one_accounts_task_stops_between_rows_once_its_budget_is_spent(accounts, engine, celery_app, fake_am):
    account, _ = accounts.create()
    requesting(engine, account, "revert:in_up")
    # Two calls, neither replacing the other: entitlements ahead of a lifecycle request go first.
    write_events(engine, account, 1, [EntitlementsChanged(entitlements={"products": {"prod_core": "restricted"}})])
    write_events(engine, account, 2, [UpgradeRevertRequested(invoice_id="in_up", subscription_id="sub_1")])

    with freeze_time(datetime.now(UTC) + timedelta(minutes=1)) as clock:
        # Account Management takes a minute to answer the first call: longer than the whole budget
        # (tasks.outbox.RELAY_BUDGET_SECONDS, 20 s), far shorter than the task's hard time limit.
        fake_am.before_answer = lambda request: clock.tick(60)
        result = celery_app.tasks["tasks.deliver_account_outbox"].apply(args=[account]).get()  # in this thread

    assert (result["delivered"], result["failed"]) == (1, 0)
    assert [r.kind for r in fake_am.for_account(account)] == ["entitlements"]
    first, second = outbox(engine, account)
    assert first["state"] == "delivered"
    assert (second["state"], second["attempts"], second["delivered_at"]) == ("pending", 0, None)  # next pass
