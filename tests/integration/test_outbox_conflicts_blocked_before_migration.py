"""Migration outbox_conflicts_blocked_before: rows a 409 blocked at once follow the lasting-conflict rule.

Until 7f7a99a a 409 blocked its row at its first answer; now it blocks only once the row has been
answered 409 for over 1 h since the first 409 of its streak (outbox.conflict_since). blocked_at stays
from a row's first refusal on, so the rows blocked before stayed blocked: counted as blocked, listed
for an operator to skip, whatever the rule says. After the migration, a block under 1 h old is lifted
(retried as "not now", blocked again only if the 409s last), an older one stays (the rule blocks it
too) and says it is a lasting conflict; the other rows are untouched.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from app.db import make_engine
from app.migrate import upgrade
from app.outbox.relay import relay
from tests.integration.migration_setup import upgrade_to_before

REVISION = "outbox_conflicts_blocked_before"
LASTING = "409 for over 1 h: a lasting conflict"


def _insert(conn, account: str, blocked_at: datetime | None, status: int | None, error: str | None,
            conflict_since: datetime | None = None, delivered_at: datetime | None = None) -> None:
    conn.exec_driver_sql(
        "INSERT INTO outbox (account_id, dunning_version, event_type, payload, attempts, next_attempt_at, "
        "last_error, last_status, blocked_at, conflict_since, delivered_at, state) "
        "VALUES (%(a)s, 1, 'EntitlementsChanged', %(p)s, 3, %(next)s, %(e)s, %(s)s, %(b)s, %(c)s, %(d)s, %(state)s)",
        {"a": account, "p": json.dumps({"entitlements": {"products": {"prod_core": "read_only"}}}),
         "next": datetime.now(UTC) - timedelta(minutes=1), "e": error, "s": status, "b": blocked_at,
         "c": conflict_since, "d": delivered_at, "state": "skipped" if delivered_at else "pending"})


def _row(engine, account: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.exec_driver_sql(
            "SELECT blocked_at, conflict_since, last_error, last_status, state, attempts FROM outbox "
            "WHERE account_id = %(a)s", {"a": account}).mappings().one())


def test_rows_a_409_blocked_at_once_follow_the_lasting_conflict_rule(empty_database: str, fake_am):
    url = empty_database
    upgrade_to_before(url, REVISION)
    engine = make_engine(url)
    now = datetime.now(UTC).replace(microsecond=0)
    recent, old = now - timedelta(minutes=10), now - timedelta(hours=3)
    try:
        with engine.begin() as conn:
            _insert(conn, "acct_recent", recent, 409, "HTTP 409: request_in_progress")
            _insert(conn, "acct_old", old, 409, "HTTP 409: subscription_locked: in another workflow")
            _insert(conn, "acct_refused", recent, 404, "HTTP 404: unknown account")
            _insert(conn, "acct_lasting", recent, 409, f"{LASTING}; HTTP 409: locked", conflict_since=old)
            _insert(conn, "acct_skipped", recent, 409, "HTTP 409: locked", delivered_at=recent)
            _insert(conn, "acct_not_blocked", None, 409, "HTTP 409: request_in_progress")

        upgrade(url)

        assert _row(engine, "acct_recent") == {
            "blocked_at": None, "conflict_since": recent, "last_error": "HTTP 409: request_in_progress",
            "last_status": 409, "state": "pending", "attempts": 3}
        assert _row(engine, "acct_old") == {
            "blocked_at": old, "conflict_since": old,
            "last_error": f"{LASTING}; HTTP 409: subscription_locked: in another workflow",
            "last_status": 409, "state": "pending", "attempts": 3}
        # Not blocked by a 409 of the old rule: as they were.
        assert _row(engine, "acct_refused")["blocked_at"] == recent
        assert _row(engine, "acct_refused")["conflict_since"] is None
        assert _row(engine, "acct_lasting") == {
            "blocked_at": recent, "conflict_since": old, "last_error": f"{LASTING}; HTTP 409: locked",
            "last_status": 409, "state": "pending", "attempts": 3}
        assert (_row(engine, "acct_skipped")["blocked_at"], _row(engine, "acct_skipped")["conflict_since"]) == (
            recent, None)
        assert _row(engine, "acct_not_blocked")["conflict_since"] is None

        # From here the relay's rule: the recent one's 409 is "not now" until its streak passes 1 h.
        for account in ("acct_recent", "acct_old"):
            fake_am.refuse(account, 409, {"error": "subscription_locked"})
        fake_am.accept("acct_refused")
        relay(engine, fake_am.url, now=now)
        row = _row(engine, "acct_recent")
        assert (row["blocked_at"], row["last_status"], row["last_error"]) == (
            None, 409, "HTTP 409: subscription_locked")
        row = _row(engine, "acct_old")
        assert (row["blocked_at"], row["last_error"]) == (old, f"{LASTING}; HTTP 409: subscription_locked")
        assert _row(engine, "acct_refused")["state"] == "delivered"  # retried, as any blocked row

        later = recent + timedelta(hours=1, minutes=1)
        relay(engine, fake_am.url, now=later)
        row = _row(engine, "acct_recent")
        assert (row["blocked_at"], row["conflict_since"], row["last_error"]) == (
            later, recent, f"{LASTING}; HTTP 409: subscription_locked")
    finally:
        engine.dispose()
