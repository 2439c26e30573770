"""Failed sign-ins are seen: one log line each (the client's address, never the token; no actor, as
none is known) and a count in dunning_support_sign_in_failures_total{reason}, so that someone trying
tokens at /support/login shows on a dashboard and in the log."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY

from tests.conftest import SUPPORT_TOKEN, Accounts

FAILURES = "dunning_support_sign_in_failures_total"


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value(FAILURES, {"reason": reason}) or 0.0


def sign_in_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "sign-in" in r.getMessage() and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("token", ["nope", SUPPORT_TOKEN + "x", SUPPORT_TOKEN[:-1], ""])
def test_a_wrong_token_is_logged_without_it_and_counted(flask_app, accounts: Accounts, caplog, token: str) -> None:
    client = flask_app.test_client()
    account, _ = accounts.create()
    before, cross_before = failures("token"), failures("cross_origin")
    with caplog.at_level(logging.WARNING):
        refused = client.post("/support/login", data={"token": token, "next": f"/support/accounts/{account}"},
                              environ_base={"REMOTE_ADDR": "203.0.113.7"})
    assert refused.status_code == 401
    assert failures("token") == before + 1
    assert failures("cross_origin") == cross_before
    [line] = sign_in_lines(caplog)
    assert "203.0.113.7" in line
    assert (token == "" or token not in line) and SUPPORT_TOKEN[4:] not in line


def test_a_cross_origin_sign_in_is_counted_apart(flask_app, accounts: Accounts, caplog) -> None:
    client = flask_app.test_client()
    before, token_before = failures("cross_origin"), failures("token")
    with caplog.at_level(logging.WARNING):
        refused = client.post("/support/login", headers={"Sec-Fetch-Site": "cross-site"},
                              data={"token": SUPPORT_TOKEN, "next": "/support/lifting"},
                              environ_base={"REMOTE_ADDR": "198.51.100.9"})
    assert refused.status_code == 403
    assert failures("cross_origin") == before + 1 and failures("token") == token_before
    [line] = sign_in_lines(caplog)
    assert "198.51.100.9" in line and SUPPORT_TOKEN not in line


def test_a_good_sign_in_counts_no_failure_and_logs_none(flask_app, accounts: Accounts, caplog) -> None:
    client = flask_app.test_client()
    account, _ = accounts.create()
    before = {reason: failures(reason) for reason in ("token", "cross_origin")}
    with caplog.at_level(logging.WARNING):
        assert client.post("/support/login", data={"token": SUPPORT_TOKEN,
                                                   "next": f"/support/accounts/{account}"}).status_code == 303
    assert {reason: failures(reason) for reason in before} == before
    assert sign_in_lines(caplog) == []


def test_the_counter_is_served_at_metrics_with_both_reasons(client, clean) -> None:
    text = client.get("/metrics").get_data(as_text=True)
    for reason in ("token", "cross_origin"):
        assert f'{FAILURES}{{reason="{reason}"}}' in text
