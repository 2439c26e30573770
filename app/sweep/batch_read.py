"""The sweep's batch read: a keyset page of account ids, then recompute's own gather_many for the
page (one statement), so the sweep sees exactly the snapshot recompute sees."""

from __future__ import annotations

from sqlalchemy import Connection

from app.domain.snapshot import Snapshot
from app.recompute.gather import gather_many

PAGE_SQL = "SELECT account_id FROM subs_account WHERE account_id > %(last)s ORDER BY account_id LIMIT %(batch)s"


def read_batch(conn: Connection, last: str, batch: int) -> tuple[list[str], dict[str, tuple[Snapshot, int]]]:
    """-> (account ids of the page in order, {id: (snapshot, stored version)})."""
    ids = [r[0] for r in conn.exec_driver_sql(PAGE_SQL, {"last": last, "batch": batch})]
    return ids, (gather_many(conn, ids) if ids else {})
