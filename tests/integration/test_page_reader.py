"""The sweep's read-ahead reader: the same pages as read_batch, each read in one REPEATABLE READ,
READ ONLY transaction, with the shorter GIL switch interval only while it runs."""

from __future__ import annotations

import sys
from typing import Any

from sqlalchemy import Engine, event

from app.sweep.batch_read import SWITCH_INTERVAL, PageReader, read_batch
from tests.conftest import Accounts


def test_page_reader_reads_consistent_pages_and_restores_the_switch_interval(accounts: Accounts, engine: Engine):
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

    seen: list[tuple[str, bool]] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "dunning_batch" in statement:
            dbapi = conn.connection.dbapi_connection
            cursor.execute("SELECT current_setting('transaction_isolation')")
            seen.append((cursor.fetchone()[0], dbapi.readonly))

    before = sys.getswitchinterval()
    event.listen(engine, "before_cursor_execute", record)
    try:
        pages = []
        with PageReader(engine, "", 3) as reader:
            for page in reader:
                assert sys.getswitchinterval() == min(before, SWITCH_INTERVAL)
                pages.append(page)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert sys.getswitchinterval() == before
    assert pages == expected and [i for p in pages for i in p[0]] == ids
    assert seen and all(s == ("repeatable read", True) for s in seen), seen
