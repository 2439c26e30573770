"""GET /metrics is open (no token) and reads the database gauges (app/metrics_db.py GAUGES_SQL: counts
over outbox, subs_dunning, bad_debt_payment..., 50 ms at production volumes) on every scrape. Scrapes
arriving while one is reading them must not each start another read: otherwise anyone who can reach
the web port holds as many of the process's database connections as requests they keep open (the pool
is 10), and the webhooks, /pay-bad-debt and the support page wait for a connection behind them."""

from __future__ import annotations

import threading
from typing import Any

from flask import Flask
from sqlalchemy import event

from app.metrics_db import GAUGES_SQL

SCRAPES = 6
GUARD = 30  # seconds: only so that a broken run fails instead of hanging; nothing is timed


def test_concurrent_scrapes_read_the_database_gauges_once_at_a_time(flask_app: Flask, runtime, clean):
    cond = threading.Condition()
    state = {"running": 0, "most": 0, "reads": 0, "answered": 0}
    release = threading.Event()

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement != GAUGES_SQL:
            return
        with cond:
            state["reads"] += 1
            state["running"] += 1
            state["most"] = max(state["most"], state["running"])
            cond.notify_all()
        release.wait(GUARD)  # the first read is held until every other scrape has started or answered

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement == GAUGES_SQL:
            with cond:
                state["running"] -= 1

    statuses: list[int] = []

    def scrape() -> None:
        response = flask_app.test_client().get("/metrics")
        with cond:
            statuses.append(response.status_code)
            state["answered"] += 1
            cond.notify_all()

    event.listen(runtime.engine, "before_cursor_execute", before)
    event.listen(runtime.engine, "after_cursor_execute", after)
    try:
        first = threading.Thread(target=scrape)
        first.start()
        with cond:
            assert cond.wait_for(lambda: state["running"] == 1, GUARD)  # the first scrape is reading
        others = [threading.Thread(target=scrape) for _ in range(SCRAPES - 1)]
        for t in others:
            t.start()
        with cond:
            # Each other scrape either answered or is reading the gauges itself.
            assert cond.wait_for(lambda: state["answered"] + state["running"] - 1 == SCRAPES - 1, GUARD)
        release.set()
        for t in [first, *others]:
            t.join(GUARD)
    finally:
        release.set()
        event.remove(runtime.engine, "before_cursor_execute", before)
        event.remove(runtime.engine, "after_cursor_execute", after)
    assert statuses == [200] * SCRAPES
    assert state["most"] == 1 and state["reads"] == 1, state


def test_a_scrape_after_a_read_ends_reads_the_gauges_again(client, runtime, clean):
    reads = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement == GAUGES_SQL:
            reads.append(statement)

    event.listen(runtime.engine, "before_cursor_execute", before)
    try:
        assert client.get("/metrics").status_code == 200
        assert client.get("/metrics").status_code == 200
    finally:
        event.remove(runtime.engine, "before_cursor_execute", before)
    assert len(reads) == 2
