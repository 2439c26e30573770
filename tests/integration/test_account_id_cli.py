"""The `dunning` commands that take account ids, in process, with ids of any form (other teams choose
them): '/', '?', '#', '%', spaces, '+', unicode, dots, a leading '-' (after `--`, or as `--account=`)."""

from __future__ import annotations

import json

import pytest

from app.cli import main
from app.domain.events import EntitlementsChanged
from tests.conftest import Accounts
from tests.integration.test_outbox_relay import write_events

ODD_IDS = ["acct/1", "/acct", "acct?x=1#y", "acct%2F1", "acct 1", "acct+1", "acct\u00e9\u2713", ".", "..", "-acct",
           "x" * 2000]


@pytest.mark.parametrize("account", ODD_IDS, ids=lambda a: a if len(a) < 20 else f"{len(a)} chars")
def test_recompute_and_outbox_list_take_the_account_named(cli_env, accounts: Accounts, engine, capsys, account):
    accounts.create(account_id=account)
    assert main(["recompute", "--json", "--", account]) == 0
    assert json.loads(capsys.readouterr().out)["account_id"] == account
    write_events(engine, account, 7, [EntitlementsChanged(entitlements={"products": {}})])
    write_events(engine, "acct", 1, [EntitlementsChanged(entitlements={"products": {}})])  # another account's
    assert main(["outbox", "list", f"--account={account}", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    rows = listed["rows"] if isinstance(listed, dict) else listed
    assert rows and {r["account_id"] for r in rows} == {account}


def test_rollout_name_takes_the_accounts_named(cli_env, clean, capsys):
    assert main(["rollout", "name", "--reason", "ids of any form", "--", *ODD_IDS]) == 0
    capsys.readouterr()
    assert main(["rollout", "status", "--json"]) == 0
    assert sorted(json.loads(capsys.readouterr().out)["named_accounts"]) == sorted(ODD_IDS)
