"""Emit: one outbox row per domain event, in the transaction that changed the state."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from psycopg2.extras import Json
from sqlalchemy import Connection

from app.domain.events import DomainEvent

INSERT_OUTBOX = ("INSERT INTO outbox (account_id, dunning_version, event_type, payload, created_at, next_attempt_at) "
                 "VALUES ")
ROW = "(%(account)s, %(version)s, %(type{n})s, %(payload{n})s, %(now)s, %(now)s)"


def outbox_insert(account_id: str, version: int, events: Sequence[DomainEvent], now: datetime
                  ) -> tuple[str, dict[str, object]]:
    """The statement that writes all of a change's events, in their order, and its parameters (one
    statement, not an executemany, which psycopg2 runs as one statement per row). Its parameters
    ``account``, ``version`` and ``now`` are the state write's own, so the two can go as one."""
    params: dict[str, object] = {"account": account_id, "version": version, "now": now}
    for n, e in enumerate(events):
        params[f"type{n}"] = e.name
        params[f"payload{n}"] = Json({"account_id": account_id, "dunning_version": version, **e.payload()})
    return INSERT_OUTBOX + ", ".join(ROW.format(n=n) for n in range(len(events))), params


def emit(conn: Connection, account_id: str, version: int, events: Sequence[DomainEvent], now: datetime) -> None:
    if events:
        conn.exec_driver_sql(*outbox_insert(account_id, version, events, now))
