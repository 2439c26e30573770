"""The outbox relay names the account in Account Management's paths as one percent-encoded segment,
whatever its id (other teams choose them): '/', '?', '#', '%', spaces, '+', unicode, dots, long ids."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from app.domain.events import CancellationRequested, EntitlementsChanged
from app.outbox.relay import relay
from tests.integration.test_outbox_relay import bad_debt_episode, outbox, requesting, write_events

pytestmark = pytest.mark.worker

ODD_IDS = ["acct/1", "/acct", "acct/", "a//b", "acct?x=1", "acct#1", "acct%2F1", "acct 1", "acct+1", "acct\u00e9\u2713",
           ".", "..", "...", ".acct", "acct.", "acct/..", "../acct", "x" * 2000]


@pytest.mark.parametrize("account", ODD_IDS, ids=lambda a: a if len(a) < 20 else f"{len(a)} chars")
def test_account_management_is_called_at_the_accounts_own_path(accounts, engine, fake_am, account):
    accounts.create(account_id=account)
    requesting(engine, account, "cancel:sub_1")
    bad_debt_episode(engine, account, (datetime.now(UTC) - timedelta(days=1)).isoformat())
    write_events(engine, account, 1, [EntitlementsChanged(entitlements={"products": {"prod_core": "revoked"}}),
                                      CancellationRequested(subscription_id="sub_1", reason="retries_exhausted")])
    report = relay(engine, fake_am.url)
    assert (report.delivered, report.failed) == (2, 0), [r["last_error"] for r in outbox(engine, account)]
    put, cancel = fake_am.for_account(account)
    assert (put.kind, cancel.kind) == ("entitlements", "cancellations")
    # One segment on the wire: no '/' of the id, and no "." or ".." segment a server or proxy resolves.
    for path in fake_am.paths:
        segments = path.split("/")
        assert len(segments) == 4 and segments[:2] == ["", "accounts"] and segments[2] not in (".", ".."), path
