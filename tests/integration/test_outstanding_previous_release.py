"""A decision the previous release writes during a deploy: outstanding_amount moves, outstanding does not.

The previous release knows nothing of subs_dunning.outstanding (migration dunning_outstanding runs
before the new code, and the old workers go on recomputing until they are replaced): its apply
writes the columns it knows that changed, outstanding_amount among them, and leaves the per-currency
list of the decision before. Read as it was, that list was what the account owes: paid in full, it
still owed 1000 usd in GET /accounts/<id>/dunning (outstanding_amount 1000 beside a stored sum of
0), and owing more, the amount of before; the drift sweep found drift in it. A list that does not
add up to the stored sum is not what the decision owes: read as not known, as a row stored before
the list was kept (the account's next recompute writes it).
"""

from __future__ import annotations

from datetime import UTC, datetime

from app.domain.compute import compute
from app.domain.drift import drift_of
from app.recompute.gather import gather
from tests.conftest import Accounts
from tests.integration.test_outstanding_by_currency import failed_in, recomputed, view


def _previous_release_writes(engine, account: str, **columns: object) -> None:
    """What the previous release's apply writes: the changed columns it knows, never ``outstanding``."""
    sets = ", ".join(f"{name} = %({name})s" for name in columns)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE subs_dunning SET {sets}, version = version + 1 WHERE account_id = %(a)s",
                             {**columns, "a": account})


def test_a_debt_the_previous_release_found_paid_is_not_shown_as_still_owed(client, engine, runtime,
                                                                          accounts: Accounts):
    account, customer = accounts.create()
    failed_in(client, customer, "usd", 1000)
    recomputed(engine, runtime, account)
    assert view(client, account)["outstanding"] == [{"currency": "usd", "amount": 1000}]

    _previous_release_writes(engine, account, status="current", level="none", outstanding_amount=0,
                             unpaid_since=None)
    body = view(client, account)
    assert (body["outstanding_amount"], body["outstanding"]) == (0, []), body


def test_a_debt_the_previous_release_found_grown_is_not_known_rather_than_the_old_amount(client, engine, runtime,
                                                                                        accounts: Accounts):
    account, customer = accounts.create()
    failed_in(client, customer, "usd", 1000)
    recomputed(engine, runtime, account)
    failed_in(client, customer, "usd", 500, days_ago=2)  # its recompute run by the previous release
    _previous_release_writes(engine, account, outstanding_amount=1500)

    body = view(client, account)
    assert body["outstanding"] is None and body["outstanding_amount"] is None, body
    assert "not known" in body["outstanding_amount_reason"]
    with engine.connect() as conn:
        gathered = gather(conn, account)
    assert gathered is not None
    found = drift_of(gathered[0], compute(gathered[0], runtime.policy, datetime.now(UTC)))
    assert found is None or "outstanding" not in found.fields, found
    # The next recompute writes the list as compute has it.
    recomputed(engine, runtime, account)
    assert view(client, account)["outstanding"] == [{"currency": "usd", "amount": 1500}]
