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


def test_an_episode_is_filed_under_the_class_of_the_failure_that_made_the_bad_debt(client, accounts, engine, runtime):
    """The report counts entries by failure class: the episode's is the class of the suspended
    invoice's failure (a card expired 30 days ago), not the account's latest failure (another
    invoice declined for insufficient funds yesterday), as BadDebtEntered's is."""
    import time
    from datetime import UTC, datetime

    from app.recompute.service import run_recompute
    from tests.conftest import post_event
    from tests.integration.test_outbox_cancellation_body import declined_charge, failed_invoice
    from tests.stripe_events import unique

    account, customer = accounts.create()
    now, day = int(time.time()), 86400
    for evt in (failed_invoice(customer, unique("in"), now - 30 * day),
                declined_charge(customer, now - 30 * day + 1, "expired_card"),
                failed_invoice(customer, unique("in"), now - day),
                declined_charge(customer, now - day + 1, "insufficient_funds")):
        assert post_event(client, evt).status_code == 200
    result = run_recompute(engine, runtime.policy, account, "STATE_REFRESH", datetime.now(UTC))
    assert result.decision is not None and result.decision.state.status == "bad_debt"
    assert result.decision.state.failure_class == "transient"  # the account's latest failure
    with engine.connect() as conn:
        filed = conn.exec_driver_sql("SELECT failure_class FROM bad_debt_episode WHERE account_id = %(a)s",
                                     {"a": account}).scalar_one()
        entered = conn.exec_driver_sql("SELECT payload FROM outbox WHERE account_id = %(a)s "
                                       "AND event_type = 'BadDebtEntered'", {"a": account}).scalar_one()
    assert (filed, entered["failure_class"]) == ("permanent", "permanent")
