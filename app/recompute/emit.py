"""Emit: one outbox row per domain event, in the transaction that changed the state."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from psycopg2.extras import Json
from sqlalchemy import Connection

from app.domain.events import DomainEvent

INSERT_OUTBOX = """
INSERT INTO outbox (account_id, dunning_version, event_type, payload, created_at, next_attempt_at)
VALUES (%(account)s, %(version)s, %(type)s, %(payload)s, %(now)s, %(now)s)
"""


def emit(conn: Connection, account_id: str, version: int, events: Sequence[DomainEvent], now: datetime) -> None:
    if not events:
        return
    conn.exec_driver_sql(INSERT_OUTBOX, [
        {"account": account_id, "version": version, "type": e.name,
         "payload": Json({"account_id": account_id, "dunning_version": version, **e.payload()}), "now": now}
        for e in events
    ])
