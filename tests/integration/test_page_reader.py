"""The sweep's read-ahead reader: the same pages as read_batch, each read in a REPEATABLE READ,
READ ONLY transaction of its own, with the shorter GIL switch interval only while it runs."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from sqlalchemy import Connection, Engine

from app.recompute import gather_batch
from app.sweep.batch_read import SWITCH_INTERVAL, PageReader, read_batch
from tests.conftest import Accounts


def test_page_reader_reads_consistent_pages_and_restores_the_switch_interval(accounts: Accounts, engine: Engine,
                                                                            monkeypatch: pytest.MonkeyPatch):
    ids = sorted(accounts.create(account_id=f"acct_pr_{n}")[0] for n in range(7))
    with engine.connect() as conn:
        expected: list[Any] = []
        last = ""
        while True:
            page = read_batch(conn, last, 3)
            expected.append(page)
            if len(page[0]) < 3:
                break
            last = page[0][-1]

    seen: list[tuple[str, str, Any]] = []
    details = gather_batch.fetch_prepared_row

    def record(conn: Connection, *calls: Any) -> Any:
        # In the page's transaction, before its details statement: what that transaction is.
        with conn.connection.driver_connection.cursor() as cursor:  # type: ignore[union-attr]
            cursor.execute("SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only'), "
                           "now()")  # now(): when the transaction started
            seen.append(cursor.fetchone())
        return details(conn, *calls)

    monkeypatch.setattr(gather_batch, "fetch_prepared_row", record)
    before = sys.getswitchinterval()
    pages = []
    with PageReader(engine, "", 3) as reader:
        for page in reader:
            assert sys.getswitchinterval() == min(before, SWITCH_INTERVAL)
            pages.append(page)
    assert sys.getswitchinterval() == before
    assert pages == expected and [i for p in pages for i in p[0]] == ids
    assert len(seen) == len(pages) and all(s[:2] == ("repeatable read", "on") for s in seen), seen
    assert len({s[2] for s in seen}) == len(seen), "every page is read in a transaction of its own"
