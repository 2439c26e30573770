"""Rows Account Management refuses as wrong (a 4xx other than 408/409/425/429, or a 409 that lasts),
against the fake Account Management: each row keeps its last answer (status and a short, secret-free
reason), a refused row counts as blocked (gauge dunning_outbox_blocked) and is still retried, never dropped; an operator
lists the rows that wait (`dunning outbox list`) and skips one (`dunning outbox skip`), audited,
after which the account's later rows are delivered. The skipped row is kept, in state skipped."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import pytest
from freezegun import freeze_time

from app.cli import main
from app.domain.events import DunningEntered, EntitlementsChanged
from app.outbox.relay import account_lock, relay
from tests.conftest import service_headers
from tests.fakes.fake_account_management import IN_PROGRESS
from tests.integration.dunning_setup import dunning_row, failed_invoice, paid
from tests.integration.test_metrics import metrics, value
from tests.integration.test_outbox_relay import LATER, outbox, write_events

UNKNOWN_ACCOUNT = {"error": "unknown_account", "message": "no such account"}


def entitlements(engine, account: str, version: int, **products: str) -> None:
    write_events(engine, account, version, [EntitlementsChanged(entitlements={"products": products})])


def audit(engine, action: str) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT * FROM audit_log WHERE action = %(a)s ORDER BY id", {"a": action})
        return [dict(r) for r in rows.mappings()]


@pytest.mark.parametrize("status", [400, 401, 404, 410, 422])
def test_a_row_refused_as_wrong_keeps_its_answer_counts_as_blocked_and_is_still_retried(
        client, accounts, engine, fake_am, status):
    refused, _ = accounts.create()
    other, _ = accounts.create()
    entitlements(engine, refused, 1, prod_core="full")
    # Behind it, a row that waits for it (a newer EntitlementsChanged would replace it instead).
    write_events(engine, refused, 2, [DunningEntered(unpaid_since=None, failure_class="transient")])
    entitlements(engine, other, 1, prod_core="full")
    fake_am.refuse(refused, status, UNKNOWN_ACCOUNT)
    now = datetime.now(UTC) + LATER

    report = relay(engine, fake_am.url, now=now)
    assert (report.delivered, report.failed) == (1, 1)
    first, second = outbox(engine, refused)
    assert first["last_status"] == status and first["attempts"] == 1 and first["state"] == "pending"
    assert first["last_error"] == f"HTTP {status}: unknown_account: no such account"
    assert first["blocked_at"] == now and first["delivered_at"] is None
    assert second["attempts"] == 0 and second["blocked_at"] is None  # never tried before the first
    (delivered,) = outbox(engine, other)
    assert (delivered["state"], delivered["last_status"], delivered["last_error"]) == ("delivered", 200, None)
    assert value(metrics(client), "dunning_outbox_blocked") == 1
    assert client.get("/ops/outbox", headers=service_headers()).json["blocked"] == 1

    # Still retried with backoff (the contract), and still blocked after an answer that says "not
    # now" (a 503 says nothing about the request being right).
    fake_am.mode = "failing"
    relay(engine, fake_am.url, now=now + LATER)
    first = outbox(engine, refused)[0]
    assert (first["attempts"], first["last_status"], first["blocked_at"]) == (2, 503, now)
    assert value(metrics(client), "dunning_outbox_blocked") == 1

    # Account Management learns the account: everything goes, in order, and nothing is blocked.
    fake_am.mode = "up"
    fake_am.accept(refused)
    assert relay(engine, fake_am.url, now=now + 2 * LATER).delivered == 2
    assert [r["state"] for r in outbox(engine, refused)] == ["delivered", "delivered"]
    assert value(metrics(client), "dunning_outbox_blocked") == 0


# 409 and 425: both calls are idempotent (DESIGN 11), so a conflict (a request under the same key still
# being processed) or Too Early says "not now" too, not that the request is wrong.
@pytest.mark.parametrize("status", [408, 409, 425, 429, 500, 503])
def test_an_answer_that_says_not_now_is_recorded_but_does_not_block(client, accounts, engine, fake_am, status):
    account, _ = accounts.create()
    entitlements(engine, account, 1, prod_core="full")
    fake_am.refuse(account, status, {"error": "try_later"})
    relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    (row,) = outbox(engine, account)
    assert (row["last_status"], row["last_error"], row["blocked_at"]) == (status, f"HTTP {status}: try_later", None)
    assert value(metrics(client), "dunning_outbox_blocked") == 0


def test_a_retry_meeting_its_first_request_still_in_progress_is_not_blocked_and_goes_later(
        client, accounts, engine, fake_am):
    """The relay gave up on a call (its time limit) that Account Management goes on processing: the
    retry, under the same Idempotency-Key, is answered 409 while it does. That is "not now": the row
    is retried with backoff, not blocked, and once the first request is done the retry is delivered
    and the account's later rows go."""
    account, _ = accounts.create()
    entitlements(engine, account, 1, prod_core="full")
    write_events(engine, account, 2, [DunningEntered(unpaid_since=None, failure_class="transient")])
    arrived, done = threading.Event(), threading.Event()

    def processing(_request) -> None:  # the first request is processed until done
        arrived.set()
        done.wait(30)

    fake_am.before_answer = processing
    now = datetime.now(UTC) + LATER
    try:
        relay(engine, fake_am.url, now=now, timeout=(0.5, 0.5))
        assert "Timeout" in outbox(engine, account)[0]["last_error"]  # no answer in time
        assert arrived.wait(30)  # and Account Management has it

        report = relay(engine, fake_am.url, now=now + LATER)
        assert (report.delivered, report.failed) == (0, 1)
        first, second = outbox(engine, account)
        assert (first["attempts"], first["last_status"], first["blocked_at"]) == (2, 409, None)
        assert first["last_error"].startswith("HTTP 409: idempotency_key_in_use")
        assert first["next_attempt_at"] > now + LATER and second["attempts"] == 0  # backs off, the rest waits
        assert value(metrics(client), "dunning_outbox_blocked") == 0
    finally:
        done.set()
    assert fake_am.settled()

    assert relay(engine, fake_am.url, now=now + 2 * LATER).delivered == 2
    assert [r["state"] for r in outbox(engine, account)] == ["delivered", "delivered"]
    keys = {r.idempotency_key for r in fake_am.entitlements(account)}
    assert keys == {f"outbox-{first['id']}"}  # one request to Account Management, sent twice


def test_a_409_that_lasts_is_a_lasting_conflict_and_blocks(client, cli_env, accounts, engine, fake_am, capsys):
    """A 409 answered for longer than any request under the same Idempotency-Key can still be under
    way (CONFLICT_LASTING) is no request in progress but a conflict that lasts (the subscription in
    another workflow): the row is blocked like any refusal, and says why. Answers that say nothing
    about the request (a 503) do not end the streak of 409s."""
    account, _ = accounts.create()
    entitlements(engine, account, 1, prod_core="full")
    fake_am.refuse(account, 409, {"error": "subscription_locked", "message": "in another workflow"})
    start = datetime.now(UTC) + LATER

    with freeze_time(start, tick=True):
        relay(engine, fake_am.url)
    with freeze_time(start + timedelta(minutes=30), tick=True):
        relay(engine, fake_am.url)
    (row,) = outbox(engine, account)
    assert (row["attempts"], row["last_status"], row["blocked_at"]) == (2, 409, None)  # maybe still in progress
    fake_am.mode = "failing"
    with freeze_time(start + timedelta(minutes=45), tick=True):
        relay(engine, fake_am.url)
    assert outbox(engine, account)[0]["last_status"] == 503
    assert value(metrics(client), "dunning_outbox_blocked") == 0

    fake_am.mode = "up"
    blocked_from = start + timedelta(hours=1, minutes=1)
    with freeze_time(blocked_from, tick=True):
        report = relay(engine, fake_am.url)
        assert main(["outbox", "list", "--blocked"]) == 0
    assert report.failed == 1
    (row,) = outbox(engine, account)
    assert (row["attempts"], row["last_status"], row["state"]) == (4, 409, "pending")
    assert row["blocked_at"] is not None and row["blocked_at"] >= blocked_from
    assert row["last_error"] == ("409 for over 1 h: a lasting conflict; "
                                 "HTTP 409: subscription_locked: in another workflow")
    assert value(metrics(client), "dunning_outbox_blocked") == 1
    assert any(line.split()[:1] == [str(row["id"])] for line in capsys.readouterr().out.splitlines())

    # Still retried, as any blocked row: once the conflict is gone it is delivered.
    fake_am.accept(account)
    with freeze_time(start + 3 * LATER, tick=True):
        assert relay(engine, fake_am.url).delivered == 1
    assert outbox(engine, account)[0]["state"] == "delivered"
    assert value(metrics(client), "dunning_outbox_blocked") == 0


def test_a_409_streak_that_ends_in_a_2xx_never_blocks(client, accounts, engine, fake_am):
    """The first request under the key finishes: the retry is taken (2xx), however long ago the first
    409 was, and the next row's 409s are a streak of their own."""
    account, _ = accounts.create()
    entitlements(engine, account, 1, prod_core="full")
    write_events(engine, account, 2, [DunningEntered(unpaid_since=None, failure_class="transient")])
    fake_am.refuse(account, 409, IN_PROGRESS)
    start = datetime.now(UTC) + LATER

    with freeze_time(start, tick=True):
        relay(engine, fake_am.url)
    with freeze_time(start + timedelta(minutes=50), tick=True):
        relay(engine, fake_am.url)
    first, _ = outbox(engine, account)
    assert (first["attempts"], first["last_status"], first["blocked_at"]) == (2, 409, None)

    fake_am.accept(account)
    with freeze_time(start + 2 * LATER, tick=True):
        assert relay(engine, fake_am.url).delivered == 2
    rows = outbox(engine, account)
    assert [(r["state"], r["blocked_at"]) for r in rows] == [("delivered", None)] * 2
    assert rows[0]["last_status"] == 200
    assert value(metrics(client), "dunning_outbox_blocked") == 0

    # A later row answered 409 for the first time is not blocked by the earlier row's streak.
    entitlements(engine, account, 3, prod_core="restricted")
    fake_am.refuse(account, 409, IN_PROGRESS)
    with freeze_time(start + 3 * LATER, tick=True):
        relay(engine, fake_am.url)
    third = outbox(engine, account)[2]
    assert (third["last_status"], third["blocked_at"]) == (409, None)
    assert value(metrics(client), "dunning_outbox_blocked") == 0


def test_no_answer_leaves_no_status(accounts, engine, fake_am):
    account, _ = accounts.create()
    entitlements(engine, account, 1, prod_core="full")
    fake_am.down()
    relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    (row,) = outbox(engine, account)
    assert row["last_status"] is None and "no answer" in row["last_error"] and row["blocked_at"] is None


@pytest.mark.parametrize("body, expected", [
    # JSON: what it says is wrong, not what it echoes back
    (b'{"error": "invalid_request", "message": "unknown product", "debug": {"authorization": "Bearer abc.def"},'
     b' "api_key": "k_live_123", "trace": "' + b"x" * 5000 + b'"}', "HTTP 422: invalid_request: unknown product"),
    # a proxy's HTML page: its text, whitespace collapsed, credentials it quotes masked
    (b"<html><body><h1>422 Unprocessable</h1>\n\n<p>PUT http://relay:hunter2@am.internal/accounts?token=abc123"
     b" with Authorization: Bearer s3cr3t-t0ken refused</p>" + b"x" * 5000 + b"</body></html>",
     "HTTP 422: 422 Unprocessable PUT http://***@am.internal/accounts?token=*** with Authorization: *** refused"),
])
def test_the_recorded_reason_is_short_and_holds_no_secret(accounts, engine, fake_am, body, expected):
    account, _ = accounts.create()
    entitlements(engine, account, 1, prod_core="full")
    fake_am.answer_raw(account, 422, body)
    relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    (row,) = outbox(engine, account)
    assert row["last_error"].startswith(expected) and len(row["last_error"]) <= 220
    for secret in ("abc.def", "k_live_123", "hunter2", "abc123", "s3cr3t"):
        assert secret not in row["last_error"]
    assert row["last_status"] == 422 and row["blocked_at"] is not None


def test_an_operator_lists_the_blocked_row_and_skips_it_then_the_accounts_later_rows_go(
        client, cli_env, accounts, engine, worker, fake_am, capsys):
    """Account Management refuses one version of a customer's entitlements as wrong (422). The
    operator finds the row and skips it with why; the account's later rows (the customer pays) reach
    Account Management. (A newer EntitlementsChanged already waiting replaces a refused one without
    an operator: test_outbox_blocked_review.py.)"""
    account, customer = accounts.create()
    invoice = failed_invoice(client, engine, account, customer, "insufficient_funds", days_ago=15)
    (wrong,) = [r for r in outbox(engine, account) if r["event_type"] == "EntitlementsChanged"]
    fake_am.refuse(account, 422, {"error": "invalid_entitlements", "message": "level unknown"},
                   dunning_version=wrong["dunning_version"])
    relay(engine, fake_am.url)
    relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)  # the refused row, tried again
    assert fake_am.entitlements(account) == []
    assert value(metrics(client), "dunning_outbox_blocked") == 1

    with freeze_time(wrong["created_at"] + timedelta(hours=3, minutes=5), tick=True):
        assert main(["outbox", "list", "--blocked"]) == 0
    listed = capsys.readouterr().out
    row = outbox(engine, account)
    refused = next(r for r in row if r["id"] == wrong["id"])
    assert refused["attempts"] == 2 and refused["state"] == "pending"
    line = next(text for text in listed.splitlines() if text.split()[:1] == [str(wrong["id"])])
    for shown in (account, "EntitlementsChanged", " 2 ", "422", "invalid_entitlements: level unknown", "3h 5m"):
        assert shown in line, (shown, listed)
    assert "1 blocked" in listed

    assert main(["outbox", "skip", str(wrong["id"]), "--actor", "alice",
                 "--reason", "AM refuses the restricted level for legacy plans; paid since"]) == 0
    assert f"skipped outbox row {wrong['id']}" in capsys.readouterr().out
    (entry,) = audit(engine, "outbox.skip")
    assert (entry["actor"], entry["account_id"]) == ("alice", account)
    assert entry["detail"]["outbox_id"] == wrong["id"]
    assert entry["detail"]["reason"] == "AM refuses the restricted level for legacy plans; paid since"
    assert (entry["detail"]["last_status"], entry["detail"]["event_type"]) == (422, "EntitlementsChanged")

    paid(client, engine, account, customer, invoice)
    relay(engine, fake_am.url, now=datetime.now(UTC) + 2 * LATER)
    rows = {r["id"]: r for r in outbox(engine, account)}
    assert rows[wrong["id"]]["state"] == "skipped" and rows[wrong["id"]]["last_status"] == 422  # kept
    assert all(r["delivered_at"] is not None for r in rows.values())
    sent = fake_am.entitlements(account)
    assert sent and all(r.body["dunning_version"] > wrong["dunning_version"] for r in sent)
    assert sent[-1].body["entitlements"] == dunning_row(engine, account)["entitlements"]  # paid: restored
    assert value(metrics(client), "dunning_outbox_blocked") == 0


def test_the_list_shows_every_undelivered_row_and_the_blocked_ones_on_request(cli_env, accounts, engine, fake_am,
                                                                              capsys):
    blocked, _ = accounts.create()
    waiting, _ = accounts.create()
    entitlements(engine, blocked, 1, prod_core="full")
    fake_am.refuse(blocked, 404, UNKNOWN_ACCOUNT)
    relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    entitlements(engine, blocked, 2, prod_core="restricted")  # waits behind the blocked row (backing off)
    entitlements(engine, waiting, 1, prod_core="full")
    fake_am.down()  # the blocked row backs off: this pass tries only the other account
    relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    ids = {account: [r["id"] for r in outbox(engine, account)] for account in (blocked, waiting)}

    assert main(["outbox", "list"]) == 0
    every = capsys.readouterr().out
    shown = [int(text.split()[0]) for text in every.splitlines() if text[:1].isdigit()]
    assert shown == sorted(ids[blocked] + ids[waiting])
    assert "undelivered: 3 rows, 1 blocked" in every

    assert main(["outbox", "list", "--blocked"]) == 0
    only = capsys.readouterr().out
    assert [int(text.split()[0]) for text in only.splitlines() if text[:1].isdigit()] == ids[blocked][:1]

    assert main(["outbox", "list", "--account", waiting, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert (listed["undelivered"], listed["blocked"]) == (1, 0)  # that account's
    (row,) = listed["rows"]
    assert (row["id"], row["account_id"], row["last_status"], row["blocked"]) == (ids[waiting][0], waiting, None,
                                                                                  False)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("args, problem", [
    (["outbox", "skip", "999999999", "--actor", "alice", "--reason", "x"], "no outbox row 999999999"),
    (["outbox", "skip", "abc", "--actor", "alice", "--reason", "x"], "'abc' is not an outbox row id"),
    (["outbox", "skip", "--actor", "alice", "--reason", "x"], "the id of the outbox row to skip is required"),
    (["outbox", "skip", "ROW", "--reason", "x"], "--actor NAME is required"),
    (["outbox", "skip", "ROW", "--actor", "  ", "--reason", "x"], "--actor NAME is required"),
    (["outbox", "skip", "ROW", "--actor", "alice"], "--reason TEXT is required"),
    (["outbox", "skip", "ROW", "--actor", "alice", "--reason", ""], "--reason TEXT is required"),
    (["outbox", "list", "--limit", "zero"], "--limit must be a whole number from 1 to"),
])
def test_bad_input_is_one_line_naming_the_problem(cli_env, accounts, engine, capsys, args, problem):
    account, _ = accounts.create()
    entitlements(engine, account, 1, prod_core="full")
    (row,) = outbox(engine, account)
    code = main([str(row["id"]) if a == "ROW" else a for a in args])
    assert code == 2 and problem in _one_line_error(capsys)
    assert outbox(engine, account)[0]["state"] == "pending" and audit(engine, "outbox.skip") == []


def test_a_row_already_done_with_cannot_be_skipped(cli_env, accounts, engine, fake_am, capsys):
    account, _ = accounts.create()
    write_events(engine, account, 1, [DunningEntered(unpaid_since=None, failure_class="transient")])
    entitlements(engine, account, 1, prod_core="restricted")
    relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    entitlements(engine, account, 2, prod_core="full")
    info, sent, pending = outbox(engine, account)
    for done in (info, sent):
        assert main(["outbox", "skip", str(done["id"]), "--actor", "alice", "--reason", "x"]) == 2
        assert f"outbox row {done['id']} was already delivered" in _one_line_error(capsys)

    assert main(["outbox", "skip", str(pending["id"]), "--actor", "alice", "--reason", "not needed"]) == 0
    capsys.readouterr()
    assert main(["outbox", "skip", str(pending["id"]), "--actor", "bob", "--reason", "again"]) == 2
    assert f"outbox row {pending['id']} was already skipped" in _one_line_error(capsys)
    assert [e["actor"] for e in audit(engine, "outbox.skip")] == ["alice"]


def test_a_row_the_relay_is_sending_is_not_skipped_under_it(cli_env, accounts, engine, capsys):
    account, _ = accounts.create()
    entitlements(engine, account, 1, prod_core="full")
    (row,) = outbox(engine, account)
    with account_lock(engine, account) as got:
        assert got
        assert main(["outbox", "skip", str(row["id"]), "--actor", "alice", "--reason", "x"]) == 1
        assert "is delivering" in _one_line_error(capsys)
    assert outbox(engine, account)[0]["state"] == "pending"



def test_the_migration_gives_the_existing_rows_their_state(empty_database):
    """Rows written before the migration: the undelivered ones are pending (the relay and the list
    read them as before), the superseded ones superseded, the rest delivered; new rows are pending."""
    from sqlalchemy import create_engine

    from app.migrate import downgrade, upgrade

    upgrade(empty_database, "sweep_error")
    engine = create_engine(empty_database)
    insert = ("INSERT INTO outbox (account_id, dunning_version, event_type, payload, delivered_at, last_error) "
              "VALUES ('acct_m', %(v)s, 'EntitlementsChanged', '{}', %(at)s, %(error)s)")
    try:
        with engine.begin() as conn:
            for version, at, error in ((1, "2026-11-01", None), (2, "2026-11-02", "superseded: cancel:sub_1 is no "
                                       "longer requested"), (3, None, "HTTP 404: unknown_account")):
                conn.exec_driver_sql(insert, {"v": version, "at": at, "error": error})
        upgrade(empty_database)
        with engine.begin() as conn:
            conn.exec_driver_sql(insert, {"v": 4, "at": None, "error": None})
            rows = conn.exec_driver_sql("SELECT state, last_status, blocked_at FROM outbox ORDER BY id").all()
        assert [tuple(r) for r in rows] == [("delivered", None, None), ("superseded", None, None),
                                            ("pending", None, None), ("pending", None, None)]
        downgrade(empty_database, "sweep_error")
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM outbox").scalar() == 4
    finally:
        engine.dispose()


def test_the_list_shows_control_characters_of_an_answer_escaped_not_sent_to_the_terminal(
        cli_env, accounts, engine, fake_am, capsys):
    """Account Management's answer is another system's text: an ANSI escape in it (a colour, a
    clear-screen, a title change) went raw into the operator's terminal through `dunning outbox
    list`, which can hide or rewrite the lines shown. Shown escaped (\\x1b), as the log does."""
    account, _ = accounts.create()
    entitlements(engine, account, 1, prod_core="full")
    fake_am.answer_raw(account, 422, b"refused \x1b[2J\x1b]0;owned\x07 now")
    relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
    assert main(["outbox", "list", "--account", account]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out, out
    assert "refused \\x1b[2J\\x1b]0;owned\\x07 now" in out, out
