"""A relay pass drains a backlog several accounts at a time, each account's rows still in order.

After an Account Management outage (200,000 rows over 50,000 accounts, bench/periodic.py), the one
pass running fleet-wide sent one call at a time: each account cost a round trip to Account
Management plus its own statements, and the backlog drained at about 130 rows/s (500 accounts a
pass of 15 s) whatever Account Management could take.
"""

from __future__ import annotations

import threading

from app.domain.events import DunningEntered, EntitlementsChanged
from app.outbox.relay import relay
from tests.integration.test_outbox_relay import outbox, write_events


def entitlements(level: str) -> EntitlementsChanged:
    return EntitlementsChanged(entitlements={"products": {"prod_core": level}, "plan_changes": False})


AT_ONCE = 4  # app.outbox.relay.PASS_CONCURRENCY


def test_a_pass_has_several_accounts_calls_under_way_at_once(accounts, engine, fake_am):
    """Account Management answers no call before AT_ONCE of them are under way: a pass sending one
    call at a time has its first call time out (5 s) and delivers nothing."""
    created = [accounts.create()[0] for _ in range(AT_ONCE)]
    for account in created:
        write_events(engine, account, 1, [entitlements("read_only")])
    together = threading.Barrier(AT_ONCE, timeout=30)
    fake_am.before_answer = lambda _request: together.wait()

    report = relay(engine, fake_am.url)

    assert report.failed == 0 and report.delivered == AT_ONCE
    assert sorted(r.account_id for r in fake_am.received) == sorted(created)


def test_each_account_is_relayed_whole_and_a_refused_one_stops_at_its_refusal(accounts, engine, fake_am):
    """Many accounts in one pass, each relayed once: its newest entitlements sent (the older one
    superseded), and the account Account Management refuses keeps that row, blocked, while the
    others are delivered."""
    created = [accounts.create()[0] for _ in range(12)]
    for account in created:
        write_events(engine, account, 1, [DunningEntered(unpaid_since=None, failure_class="transient"),
                                          entitlements("read_only")])
        write_events(engine, account, 2, [entitlements("revoked")])
    refused = created[5]
    fake_am.refuse(refused, 404, {"error": "unknown_account"})

    report = relay(engine, fake_am.url)

    assert report.accounts == 12 and report.failed == 1
    for account in created:
        versions = [r.body["dunning_version"] for r in fake_am.entitlements(account)]
        states = [(r["state"], r["blocked_at"] is not None) for r in outbox(engine, account)]
        if account == refused:
            assert versions == [] and states == [("delivered", False), ("superseded", False), ("pending", True)]
        else:
            assert versions == [2] and states == [("delivered", False), ("superseded", False), ("delivered", False)]


def test_a_pass_throttled_takes_no_further_account_nor_row(accounts, engine, fake_am):
    """Account Management throttles (429, Retry-After) every call: each of the pass's AT_ONCE threads
    ends with the account it had under way, no other account is asked in that pass, and a throttled
    account's later rows wait too."""
    created = [accounts.create()[0] for _ in range(3 * AT_ONCE)]
    for account in created:
        write_events(engine, account, 1, [entitlements("read_only")])
        write_events(engine, account, 2, [DunningEntered(unpaid_since=None, failure_class="transient")])
        fake_am.answer_raw(account, 429, b"slow down", headers={"Retry-After": "120"})

    report = relay(engine, fake_am.url)

    asked = [r for r in created if outbox(engine, r)[0]["attempts"]]
    assert 1 <= len(asked) <= AT_ONCE and report.failed == len(asked) and report.delivered == 0
    assert set(asked) <= set(created[:AT_ONCE])  # the first in line, whichever thread took them
    for account in created:
        rows = outbox(engine, account)
        assert all(r["delivered_at"] is None for r in rows)  # the informational v2 waits behind v1
