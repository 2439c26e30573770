"""`dunning report bad-debt --since DATE`: entries and exits per day, by why and product."""

from __future__ import annotations

import pytest
from psycopg2.extras import Json
from sqlalchemy import Engine

from app.cli import main

EPISODES = [
    # entered, reason, class, products, exited, how, duration
    ("2026-10-01 10:00", "retries_exhausted", "transient", ["prod_premium"], None, None, None),
    ("2026-10-01 11:00", "retries_exhausted", "transient", ["prod_premium"], "2026-10-03 11:00", "paid", 2 * 86400),
    ("2026-10-01 12:00", "marked_uncollectible", None, ["prod_core", "prod_premium"], None, None, None),
    ("2026-10-02 09:00", "retries_exhausted", "permanent", [], "2026-10-03 09:00", "resolved", 86400),
    ("2026-09-20 09:00", "retries_exhausted", "permanent", ["prod_core"], "2026-10-02 09:00", "paid", 12 * 86400),
]


@pytest.fixture
def episodes(engine: Engine, clean: None, settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    with engine.begin() as conn:
        for n, (entered, reason, cls, products, exited, how, duration) in enumerate(EPISODES):
            conn.exec_driver_sql(
                "INSERT INTO bad_debt_episode (account_id, entered_at, reason, failure_class, products, exited_at, "
                "exit_how, duration_seconds) VALUES (%(a)s, %(e)s::timestamptz, %(r)s, %(c)s, %(p)s, "
                "%(x)s::timestamptz, %(h)s, %(d)s)",
                {"a": f"acct_{n}", "e": entered + "+00", "r": reason, "c": cls, "p": Json(products),
                 "x": exited + "+00" if exited else None, "h": how, "d": duration})


def rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    return [line.split() for line in lines[2:] if line.strip() and not line.startswith("total")]


def test_report_counts_entries_and_exits_per_day_by_why_and_product(episodes, capsys):
    assert main(["report", "bad-debt", "--since", "2026-10-01"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["day", "event", "why"]
    table = rows(out)
    assert ["2026-10-01", "entry", "retries_exhausted", "transient", "prod_premium", "2"] in table
    assert ["2026-10-01", "entry", "marked_uncollectible", "-", "prod_core", "1"] in table
    assert ["2026-10-01", "entry", "marked_uncollectible", "-", "prod_premium", "1"] in table
    assert ["2026-10-02", "entry", "retries_exhausted", "permanent", "-", "1"] in table
    assert ["2026-10-02", "exit", "paid", "permanent", "prod_core", "1", "12.0"] in table
    assert ["2026-10-03", "exit", "paid", "transient", "prod_premium", "1", "2.0"] in table
    assert ["2026-10-03", "exit", "resolved", "permanent", "-", "1", "1.0"] in table
    assert not any(r[0] == "2026-09-20" for r in table)  # before --since
    assert "total: 5 entries, 3 exits" in out


def test_until_bounds_the_report(episodes, capsys):
    assert main(["report", "bad-debt", "--since", "2026-10-01", "--until", "2026-10-02"]) == 0
    table = rows(capsys.readouterr().out)
    assert {r[0] for r in table} == {"2026-10-01"}


def test_nothing_since_says_so(episodes, capsys):
    assert main(["report", "bad-debt", "--since", "2027-01-01"]) == 0
    assert "no bad-debt entries or exits since 2027-01-01" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["2026-13-01", "yesterday", "01/10/2026", ""])
def test_a_bad_date_is_a_clear_error(episodes, capsys, bad):
    assert main(["report", "bad-debt", "--since", bad]) == 2
    err = capsys.readouterr().err
    assert "--since must be a date like" in err and repr(bad) in err
