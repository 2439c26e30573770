"""The sweep's read-ahead reader: the same pages as read_batch, read as ranges by two readers side
by side, each in a REPEATABLE READ, READ ONLY transaction of its own, handed over in order, with
the shorter GIL switch interval only while it runs."""

from __future__ import annotations

import sys
import threading
from typing import Any

import pytest
from sqlalchemy import Connection, Engine

from app.recompute import gather_batch
from app.sweep import batch_read
from app.sweep.batch_read import SWITCH_INTERVAL, PageReader, read_batch
from tests.conftest import Accounts


def _keyset_pages(engine: Engine, batch: int) -> list[Any]:
    with engine.connect() as conn:
        expected: list[Any] = []
        last = ""
        while True:
            page = read_batch(conn, last, batch)
            expected.append(page)
            if len(page[0]) < batch:
                return expected
            last = page[0][-1]


def test_page_reader_reads_consistent_pages_in_order_and_restores_the_switch_interval(
        accounts: Accounts, engine: Engine, monkeypatch: pytest.MonkeyPatch):
    ids = sorted(accounts.create(account_id=f"acct_pr_{n}")[0] for n in range(7))
    expected = _keyset_pages(engine, 3)

    seen: list[tuple[str, str, Any]] = []
    details = gather_batch.fetch_prepared_row

    def record(conn: Connection, *calls: Any) -> Any:
        # In the page's transaction, before its details statement: what that transaction is.
        if calls[0][0] is gather_batch.DETAILS:
            with conn.connection.driver_connection.cursor() as cursor:  # type: ignore[union-attr]
                cursor.execute("SELECT current_setting('transaction_isolation'), "
                               "current_setting('transaction_read_only'), now()")  # now(): when it started
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
    assert [(p[0], p[1]) for p in pages] == expected and [i for p in pages for i in p[0]] == ids
    # Each range ends where the next starts; the last is open.
    assert [p[2] for p in pages] == [ids[2], ids[5], None]
    assert len(seen) == len(pages) and all(s[:2] == ("repeatable read", "on") for s in seen), seen
    assert len({s[2] for s in seen}) == len(seen), "every page is read in a transaction of its own"


def test_two_readers_read_two_ranges_at_the_same_time(accounts: Accounts, engine: Engine,
                                                      monkeypatch: pytest.MonkeyPatch):
    ids = sorted(accounts.create(account_id=f"acct_pr_{n}")[0] for n in range(6))
    both_reading = threading.Barrier(2, timeout=10)
    read_range = batch_read.read_range
    first_two: list[str] = []

    def meet(conn: Connection, after: str, upto: str | None) -> Any:
        if after in ("", ids[1]):  # the first two ranges: each waits until the other is being read too
            first_two.append(after)
            both_reading.wait()
        return read_range(conn, after, upto)

    monkeypatch.setattr(batch_read, "read_range", meet)
    with PageReader(engine, "", 2) as reader:
        pages = list(reader)
    assert sorted(first_two) == ["", ids[1]]
    assert [p[0] for p in pages] == [ids[0:2], ids[2:4], ids[4:6], []]


def test_a_range_is_read_in_the_snapshot_its_end_was_found_in(
        accounts: Accounts, engine: Engine, monkeypatch: pytest.MonkeyPatch):
    ids = sorted(accounts.create(account_id=f"acct_pr_{n}")[0] for n in range(5))
    read_range = batch_read.read_range

    def delete_first(conn: Connection, after: str, upto: str | None) -> Any:
        if after == ids[1]:  # the range (ids[1], ids[3]]: its accounts go after its end was found
            with engine.begin() as other:
                other.exec_driver_sql("DELETE FROM subs_customer WHERE account_id IN (%(a)s, %(b)s)",
                                      {"a": ids[2], "b": ids[3]})
                other.exec_driver_sql("DELETE FROM subs_account WHERE account_id IN (%(a)s, %(b)s)",
                                      {"a": ids[2], "b": ids[3]})
        return read_range(conn, after, upto)

    monkeypatch.setattr(batch_read, "read_range", delete_first)
    with PageReader(engine, "", 2, readers=1) as reader:
        pages = list(reader)
    # One consistent view per range, its end included: never a range that ends at an account it lacks.
    assert [(p[0], p[2]) for p in pages] == [(ids[0:2], ids[1]), (ids[2:4], ids[3]), ([ids[4]], None)]
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM subs_account WHERE account_id = ANY(%(ids)s)",
                                    {"ids": ids}).scalar_one() == 3


def test_a_failed_range_is_raised_where_it_was_due_after_the_ranges_before_it(accounts: Accounts, engine: Engine,
                                                                              monkeypatch: pytest.MonkeyPatch):
    ids = sorted(accounts.create(account_id=f"acct_pr_{n}")[0] for n in range(6))
    read_range = batch_read.read_range

    def fail_second(conn: Connection, after: str, upto: str | None) -> Any:
        if after == ids[1]:
            raise RuntimeError("the database went away")
        return read_range(conn, after, upto)

    monkeypatch.setattr(batch_read, "read_range", fail_second)
    got: list[list[str]] = []
    with pytest.raises(RuntimeError, match="went away"), PageReader(engine, "", 2) as reader:
        for page in reader:
            got.append(page[0])
    assert got == [ids[0:2]]
    assert not any(t.is_alive() for t in reader.readers)


def test_leaving_early_stops_the_readers(accounts: Accounts, engine: Engine):
    ids = sorted(accounts.create(account_id=f"acct_pr_{n}")[0] for n in range(9))
    with PageReader(engine, "", 1, depth=2) as reader:
        first = next(iter(reader))
    assert first[0] == ids[:1]
    assert not any(t.is_alive() for t in reader.readers)
