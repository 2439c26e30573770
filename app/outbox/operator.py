"""What an operator does with outbox rows the relay cannot deliver (``dunning outbox list|skip``).

Skipping is the one way a row is done with unsent on someone's word: the row stays (state
``skipped``, its last answer kept), the audit log says who skipped it and why, and the account's
later rows go with the relay's next pass. Account Management never hears of the skipped event: a
later EntitlementsChanged carries the full entitlements, a skipped lifecycle request is not sent.
Skipping a lifecycle request its account still asks for must be asked for by name: the subscription
of a customer in bad debt is then never cancelled (an unpaid upgrade never reverted) by dunning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine

from app.db import unit_of_work
from app.outbox.relay import account_lock, superseded, wanted
from app.support import audit

TEXT_LIMIT = 2000  # characters of an actor or a reason

LIST_SQL = """
SELECT id, account_id, dunning_version, event_type, attempts, last_status, last_error, created_at,
       next_attempt_at, blocked_at
  FROM outbox
 WHERE delivered_at IS NULL
   AND (NOT %(blocked)s OR blocked_at IS NOT NULL)
   AND (%(account)s::text IS NULL OR account_id = %(account)s)
 ORDER BY id
 LIMIT %(limit)s
"""

COUNT_SQL = """
SELECT count(*), count(blocked_at) FROM outbox
 WHERE delivered_at IS NULL AND (%(account)s::text IS NULL OR account_id = %(account)s)
"""

COLUMNS = """id, account_id, dunning_version, event_type, attempts, last_status, last_error, created_at,
       next_attempt_at, blocked_at"""

ROW_SQL = f"SELECT {COLUMNS}, state, payload FROM outbox WHERE id = %(id)s"

# The row as it is when skipped (the relay may have tried it again since the command read it).
SKIP_SQL = f"""
UPDATE outbox SET state = 'skipped', delivered_at = %(now)s
 WHERE id = %(id)s AND delivered_at IS NULL
 RETURNING {COLUMNS},
       (SELECT count(*) FROM outbox l WHERE l.account_id = outbox.account_id AND l.delivered_at IS NULL
                                        AND l.id > outbox.id)
"""

# What a lifecycle request its account still asks for leaves undone when skipped: nothing asks
# Account Management again (recompute writes a request once, when it is first asked for).
LIFECYCLE = {"CancellationRequested": ("subscription_id", "the subscription {} is not cancelled"),
             "UpgradeRevertRequested": ("invoice_id", "the upgrade of invoice {} is not reverted")}

# How a row that is no longer pending ended, as the refusal says it.
ENDED = {"delivered": "was already delivered",
         "superseded": "was superseded (not sent: no longer requested, or newer entitlements replace it)",
         "skipped": "was already skipped"}


@dataclass(frozen=True)
class Undelivered:
    id: int
    account_id: str
    dunning_version: int
    event_type: str
    attempts: int
    last_status: int | None
    last_error: str | None
    created_at: datetime
    next_attempt_at: datetime
    blocked_at: datetime | None

    @property
    def blocked(self) -> bool:
        return self.blocked_at is not None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("created_at", "next_attempt_at", "blocked_at"):
            out[key] = out[key].isoformat() if out[key] is not None else None
        return {**out, "blocked": self.blocked}


@dataclass(frozen=True)
class Skipped:
    row: Undelivered  # as it was when skipped
    later_rows: int  # of the same account, still to deliver
    consequence: str | None = None  # what dunning does not do now (a lifecycle request's)


class NotSkipped(Exception):
    """Why a row was not skipped, in one line; ``busy``: the relay held the account (try again)."""

    def __init__(self, message: str, busy: bool = False) -> None:
        super().__init__(message)
        self.busy = busy


def undelivered(conn: Connection, blocked_only: bool = False, account_id: str | None = None,
                limit: int = 50) -> list[Undelivered]:
    """The rows still to deliver, oldest first (each account's in the order they go)."""
    rows = conn.exec_driver_sql(LIST_SQL, {"blocked": blocked_only, "account": account_id, "limit": limit})
    return [Undelivered(*r) for r in rows]


def counts(conn: Connection, account_id: str | None = None) -> tuple[int, int]:
    """(rows still to deliver, of which blocked): the account's, or all."""
    total, blocked = conn.exec_driver_sql(COUNT_SQL, {"account": account_id}).one()
    return int(total), int(blocked)


def required(value: str | None, flag: str) -> str:
    """``value`` stripped; NotSkipped naming ``flag`` when it is missing, blank or too long."""
    text = (value or "").strip()
    if not text:
        raise NotSkipped(f"{flag} is required: every skip is audited with who and why")
    if len(text) > TEXT_LIMIT:
        raise NotSkipped(f"{flag.split()[0]} is too long (at most {TEXT_LIMIT} characters)")
    return text


def skip(engine: Engine, row_id: int, actor: str, reason: str, now: datetime,
         lifecycle_request: bool = False) -> Skipped:
    """Mark one undelivered row skipped and audit it. Under the account's relay lock, so the relay
    is never sending the row while it is skipped (its answer would then be recorded on a row
    Account Management took, or the skip on one it refused). A lifecycle request (a cancellation,
    an upgrade revert) is skipped only when ``lifecycle_request`` says the operator means it: its
    account still asks for it, and nothing will ask Account Management again."""
    with engine.connect() as conn:
        found = conn.exec_driver_sql(ROW_SQL, {"id": row_id}).first()
    if found is None:
        raise NotSkipped(f"no outbox row {row_id}")
    *fields, state, payload = found
    row = Undelivered(*fields)
    if state != "pending":
        raise NotSkipped(f"outbox row {row_id} {ENDED.get(state, f'is {state}')}: nothing to skip")
    consequence = _consequence(engine, row, payload or {})
    if consequence is not None and not lifecycle_request:
        raise NotSkipped(f"outbox row {row_id} is a {row.event_type} the account's state still asks for: skipped, "
                         f"{consequence} by dunning; if that is meant (Account Management has it in hand), "
                         "add --lifecycle-request")
    with account_lock(engine, row.account_id) as got:
        if not got:
            raise NotSkipped(f"the relay is delivering account {row.account_id!r} right now: nothing was changed, "
                             "try again in a few seconds", busy=True)
        with unit_of_work(engine) as conn:
            done = conn.exec_driver_sql(SKIP_SQL, {"id": row_id, "now": now}).first()
            if done is None:  # delivered or superseded between the read and the lock
                raise NotSkipped(f"outbox row {row_id} was done with meanwhile (delivered or superseded): "
                                 "nothing to skip")
            *fields, later = done
            row = Undelivered(*fields)
            audit.record(conn, actor, "outbox.skip", row.account_id, {
                "outbox_id": row.id, "reason": reason, "event_type": row.event_type,
                "dunning_version": row.dunning_version, "attempts": row.attempts, "last_status": row.last_status,
                "last_error": row.last_error, "blocked_since": row.blocked_at.isoformat() if row.blocked_at else None,
                "consequence": consequence,
            })
    return Skipped(row, int(later), consequence)


def _consequence(engine: Engine, row: Undelivered, payload: dict[str, Any]) -> str | None:
    """What skipping this row leaves undone: for a lifecycle request its account's state still asks
    for (the relay would supersede one it no longer asks for); None for any other row."""
    lifecycle = LIFECYCLE.get(row.event_type)
    if lifecycle is None or superseded(row.event_type, payload, row.created_at, wanted(engine, row.account_id)):
        return None
    field_name, consequence = lifecycle
    return consequence.format(payload.get(field_name) or "(unnamed)")
