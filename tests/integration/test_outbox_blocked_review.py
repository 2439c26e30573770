"""Review of the blocked outbox rows: a newer EntitlementsChanged replaces a blocked older one (sent
whole, it carries everything the old one said), the recorded reason holds no credential whatever
shape the answer has and costs the relay no time however long it is, skipping a lifecycle request
must be asked for by name, the audit keeps the answer the row had when it was skipped, the list's
JSON says how many rows there are beyond those shown, and the migration's downgrade and upgrade
again keep the skipped rows skipped."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import pytest

from app.cli import main
from app.domain.events import CancellationRequested
from app.outbox import operator
from app.outbox.relay import relay
from tests.conftest import service_headers
from tests.integration.dunning_setup import dunning_row, failed_invoice, paid
from tests.integration.test_metrics import metrics, value
from tests.integration.test_outbox_blocked import UNKNOWN_ACCOUNT, audit, entitlements
from tests.integration.test_outbox_relay import (
    LATER,
    bad_debt_episode,
    outbox,
    plan_over_delivered_history,
    requesting,
    write_events,
)


def test_a_newer_entitlements_change_replaces_a_blocked_older_one_without_an_operator(
        client, accounts, engine, worker, fake_am):
    """Account Management refuses one version of a customer's entitlements as wrong; the customer
    pays. The paid entitlements are sent whole: they replace the refused ones, which are not sent
    again, and nothing stays blocked. Before, they waited behind the refused row until an operator
    skipped it."""
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=15)
    (wrong,) = [r for r in outbox(engine, account) if r["event_type"] == "EntitlementsChanged"]
    fake_am.refuse(account, 422, {"error": "invalid_entitlements"}, dunning_version=wrong["dunning_version"])
    relay(engine, fake_am.url)
    assert next(r for r in outbox(engine, account) if r["id"] == wrong["id"])["blocked_at"] is not None
    paid(client, engine, account, customer, invoice)

    report = relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    rows = {r["id"]: r for r in outbox(engine, account)}
    replaced = rows[wrong["id"]]
    assert (replaced["state"], replaced["attempts"]) == ("superseded", 1)  # not sent again
    assert replaced["last_error"].startswith("superseded: ") and replaced["delivered_at"] is not None
    assert all(r["delivered_at"] is not None for r in rows.values())
    (sent,) = fake_am.entitlements(account)
    assert sent.body["dunning_version"] > wrong["dunning_version"]
    assert sent.body["entitlements"] == dunning_row(engine, account)["entitlements"]
    assert report.superseded >= 1 and report.failed == 0
    assert value(metrics(client), "dunning_outbox_blocked") == 0
    assert client.get("/ops/outbox", headers=service_headers()).json["blocked"] == 0


def test_a_blocked_entitlements_change_with_no_newer_one_stays_blocked_and_other_rows_do_not_replace_it(
        accounts, engine, fake_am):
    """Only a newer EntitlementsChanged replaces one: a lifecycle request behind it does not, and the
    newer entitlements, refused too, are blocked in their turn (never skipped over)."""
    account, _ = accounts.create()
    requesting(engine, account, "cancel:sub_1")
    episode = datetime.now(UTC).isoformat()
    bad_debt_episode(engine, account, episode)
    entitlements(engine, account, 1, prod_core="restricted")
    write_events(engine, account, 2, [CancellationRequested(subscription_id="sub_1", reason="x", episode=episode)])
    fake_am.refuse(account, 404, UNKNOWN_ACCOUNT)
    now = datetime.now(UTC) + LATER
    relay(engine, fake_am.url, now=now)
    relay(engine, fake_am.url, now=now + LATER)
    first, cancel = outbox(engine, account)
    assert (first["state"], first["attempts"], cancel["attempts"]) == ("pending", 2, 0)

    entitlements(engine, account, 3, prod_core="revoked")
    relay(engine, fake_am.url, now=now + 2 * LATER)
    first, cancel, newer = outbox(engine, account)
    assert first["state"] == "superseded"
    assert (cancel["state"], cancel["attempts"], cancel["blocked_at"] is not None) == ("pending", 1, True)
    assert newer["attempts"] == 0  # behind the refused cancellation, in order
    assert fake_am.for_account(account) == []


CREDENTIALS = ("SECRET1", "SECRET2", "SECRET3", "SECRET4", "SECRET5", "SECRET6", "SECRET7", "SECRET8", "SECRET9")


@pytest.mark.parametrize("body", [
    b"<p>PUT /accounts/x refused: Authorization: Token SECRET1 is not a bearer token</p>",
    b'{"request": {"headers": {"authorization": ["Token SECRET2"], "x-auth": "SECRET3"}}}',
    b"GET /accounts/x?key=SECRET4&auth=SECRET5 forbidden",
    b"invalid token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJTRUNSRVQ2In0.U0VDUkVUNg: expired",  # its claims: SECRET6
    b"redirect_uri=https%3A%2F%2Fam%2Fcb%3Faccess_token%3DSECRET7 rejected",
    "token=SECRET8 rejected".encode("utf-16-le"),  # sent as UTF-8 by a proxy that got it wrong
    b"\xe9chec: password=SECRET9\xff\xfe rejected",  # not UTF-8
])
def test_no_credential_an_answer_echoes_reaches_the_row(accounts, engine, fake_am, body):
    account, _ = accounts.create()
    entitlements(engine, account, 1, prod_core="full")
    fake_am.answer_raw(account, 422, body)
    relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    (row,) = outbox(engine, account)
    assert row["last_status"] == 422 and row["blocked_at"] is not None
    assert row["last_error"].startswith("HTTP 422: ") and len(row["last_error"]) <= 220
    readable = row["last_error"].replace("\\x00", "")
    for secret in (*CREDENTIALS, "eyJzdWIiOiJTRUNSRVQ2In0"):
        assert secret not in readable, row["last_error"]


def test_a_nested_json_error_gives_its_own_words(accounts, engine, fake_am):
    account, _ = accounts.create()
    entitlements(engine, account, 1, prod_core="full")
    fake_am.answer_raw(account, 422, json.dumps({"error": {"type": "invalid_request", "message": "unknown plan",
                                                           "echo": "x" * 3000}}).encode())
    relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    assert outbox(engine, account)[0]["last_error"] == "HTTP 422: invalid_request: unknown plan"


@pytest.mark.parametrize("body", [b"x" * 40_000, b"<" + b"a" * 40_000, b'{"message": "' + b"k" * 40_000 + b'"}'])
def test_a_long_answer_costs_the_relay_no_time(accounts, engine, fake_am, body, monkeypatch):
    """Masking read the whole answer with patterns that took time growing with the square of a run
    of letters: 40 kB took a minute, a megabyte hours, past the task's time limit, so the failure was
    never recorded and the same row came first again at every pass, holding up every account. The
    patterns are linear now, and what they read is bounded whatever the answer's length (asserted
    here rather than timed: tests time nothing)."""
    from app.outbox import answers

    read: list[int] = []
    mask = answers.masked
    def counting_mask(text: str) -> str:
        read.append(len(text))
        return mask(text)

    monkeypatch.setattr(answers, "masked", counting_mask)
    account, _ = accounts.create()
    other, _ = accounts.create()
    entitlements(engine, account, 1, prod_core="full")
    entitlements(engine, other, 1, prod_core="full")
    fake_am.answer_raw(account, 422, body)
    report = relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    assert read and max(read) <= answers.SCAN_LIMIT < len(body)
    assert (report.delivered, report.failed) == (1, 1)
    (row,) = outbox(engine, account)
    assert row["last_status"] == 422 and len(row["last_error"]) <= 220


def test_an_answer_nested_too_deep_to_parse_is_still_recorded_as_its_status(accounts, engine, fake_am):
    """A JSON body nested deeper than the parser's recursion limit raised out of the relay: the
    account was set aside as an unforeseen error, its answer (a 422: blocked) never recorded."""
    account, _ = accounts.create()
    entitlements(engine, account, 1, prod_core="full")
    fake_am.answer_raw(account, 422, b"[" * 100_000)
    relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    (row,) = outbox(engine, account)
    assert row["last_status"] == 422 and row["blocked_at"] is not None
    assert row["last_error"].startswith("HTTP 422: [[[")


def _blocked_cancellation(engine, fake_am, account: str) -> dict:
    requesting(engine, account, "cancel:sub_1")
    episode = datetime.now(UTC).isoformat()
    bad_debt_episode(engine, account, episode)
    write_events(engine, account, 1, [CancellationRequested(subscription_id="sub_1", reason="retries_exhausted",
                                                            episode=episode)])
    fake_am.refuse(account, 422, {"error": "invalid_request", "message": "subscription not cancellable"})
    relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    (row,) = outbox(engine, account)
    assert row["blocked_at"] is not None
    return row


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_skipping_a_cancellation_must_be_asked_for_by_name(cli_env, accounts, engine, fake_am, capsys):
    """The account's state still asks for the cancellation (one it no longer asks for is superseded by
    the relay itself): skipped, the subscription of a customer in bad debt is never cancelled by
    dunning. A mistyped id (the entitlements row beside it) must not do that."""
    account, _ = accounts.create()
    row = _blocked_cancellation(engine, fake_am, account)
    skip = ["outbox", "skip", str(row["id"]), "--actor", "alice", "--reason", "AM handles it by hand"]

    assert main(skip) == 2
    err = _one_line_error(capsys)
    assert "CancellationRequested" in err and "sub_1" in err and "--lifecycle-request" in err
    assert outbox(engine, account)[0]["state"] == "pending" and audit(engine, "outbox.skip") == []

    assert main([*skip, "--lifecycle-request"]) == 0
    out = capsys.readouterr().out
    assert "sub_1" in out and "not cancel" in out
    (entry,) = audit(engine, "outbox.skip")
    assert entry["detail"]["event_type"] == "CancellationRequested" and entry["detail"]["last_status"] == 422
    assert outbox(engine, account)[0]["state"] == "skipped"


def test_the_audit_keeps_the_answer_the_row_had_when_it_was_skipped(cli_env, accounts, engine, fake_am,
                                                                    monkeypatch, capsys):
    """A relay pass tries the row again between the command's read of it and the skip: the audit
    records the answer the row had when skipped, not the one read before."""
    account, _ = accounts.create()
    entitlements(engine, account, 1, prod_core="full")
    fake_am.refuse(account, 404, UNKNOWN_ACCOUNT)
    relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    (row,) = outbox(engine, account)
    real_lock = operator.account_lock

    @contextmanager
    def relay_first(engine_, account_id: str) -> Iterator[bool]:
        fake_am.mode = "failing"
        relay(engine, fake_am.url, now=datetime.now(UTC) + 2 * LATER)  # 503 this time
        with real_lock(engine_, account_id) as got:
            yield got

    monkeypatch.setattr(operator, "account_lock", relay_first)
    assert main(["outbox", "skip", str(row["id"]), "--actor", "alice", "--reason", "unknown to AM"]) == 0
    (entry,) = audit(engine, "outbox.skip")
    assert (entry["detail"]["attempts"], entry["detail"]["last_status"]) == (2, 503)
    assert entry["detail"]["last_error"] == "HTTP 503: unavailable"
    assert "last answer 503" in capsys.readouterr().out


def test_the_lists_json_says_how_many_rows_wait_beyond_those_shown(cli_env, accounts, engine, fake_am, capsys):
    account, _ = accounts.create()
    other, _ = accounts.create()
    entitlements(engine, account, 1, prod_core="full")
    entitlements(engine, other, 1, prod_core="full")
    fake_am.down()
    relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    for version in (2, 3):  # behind the failed row (backing off), never replacing it before its next try
        entitlements(engine, account, version, prod_core="full")

    assert main(["outbox", "list", "--account", account, "--limit", "2", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["undelivered"], shown["blocked"]) == (3, 0)
    assert [r["dunning_version"] for r in shown["rows"]] == [1, 2]
    assert set(shown["rows"][0]) >= {"id", "account_id", "event_type", "dunning_version", "attempts", "last_status",
                                     "last_error", "created_at", "next_attempt_at", "blocked_at", "blocked"}

    assert main(["outbox", "list", "--account", account]) == 0
    assert "undelivered: 3 rows, 0 blocked" in capsys.readouterr().out  # this account's, as the rows shown


def test_downgrade_and_upgrade_again_keep_skipped_rows_skipped(empty_database):
    """A skipped row has delivered_at set, as a delivered one: after a downgrade and the upgrade
    again it read 'delivered', as if Account Management had taken the event (the skip's audit says
    which rows were skipped)."""
    from sqlalchemy import create_engine

    from app.migrate import downgrade, upgrade

    upgrade(empty_database)
    engine = create_engine(empty_database)
    insert = ("INSERT INTO outbox (account_id, dunning_version, event_type, payload, delivered_at, last_error, state, "
              "last_status, blocked_at) VALUES ('acct_m', %(v)s, 'EntitlementsChanged', '{}', %(at)s, %(error)s, "
              "%(state)s, %(status)s, %(blocked)s) RETURNING id")
    rows = (  # version, delivered_at, last_error, state, last_status, blocked_at
        (1, "2026-11-01", None, "delivered", 200, None),
        (2, "2026-11-02", "superseded: cancel:sub_1 is no longer requested", "superseded", None, None),
        (3, None, "HTTP 404: unknown_account", "pending", 404, "2026-11-03"),
        (4, None, "HTTP 503: unavailable", "pending", 503, None),
        (5, None, "HTTP 422: invalid", "pending", 422, "2026-11-03"),
    )
    try:
        with engine.begin() as conn:
            ids = [conn.exec_driver_sql(insert, dict(zip(("v", "at", "error", "state", "status", "blocked"), r,
                                                         strict=True))).scalar() for r in rows]
        assert ids[4] is not None
        operator.skip(engine, ids[4], "alice", "AM refuses it", datetime.now(UTC))
        downgrade(empty_database, "sweep_error")
        upgrade(empty_database)
        with engine.begin() as conn:
            states = [r[0] for r in conn.exec_driver_sql("SELECT state FROM outbox ORDER BY id")]
        assert states == ["delivered", "superseded", "pending", "pending", "skipped"]
    finally:
        engine.dispose()


def test_looking_for_a_newer_entitlements_change_reads_no_delivered_history(engine):
    """Asked for every blocked EntitlementsChanged the pass tries: from the account's undelivered
    rows (the partial index), never its delivered ones."""
    from app.outbox.relay import NEWER_ENTITLEMENTS_SQL

    plan = plan_over_delivered_history(engine, "acct_newer_", 50, NEWER_ENTITLEMENTS_SQL,
                                       {"account": "acct_newer_1", "id": 1})
    assert "ix_outbox_pending" in plan and "Seq Scan" not in plan, plan
