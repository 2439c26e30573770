"""`dunning recompute` and `dunning db upgrade` as an operator runs them: real subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from app.policy_file import DEFAULT_POLICY
from tests.conftest import Accounts, post_event
from tests.stripe_events import event

ROOT = Path(__file__).resolve().parents[2]


def dunning(*args: str, database_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "DATABASE_URL": database_url, **env}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True,
                          env=environment, cwd=ROOT, timeout=120)


def test_recompute_prints_the_decision_and_its_reasons(client, accounts: Accounts, database_url, engine):
    account, customer = accounts.create()
    post_event(client, event("invoice.payment_failed", customer=customer, created=int(time.time()) - 8 * 86400))
    done = dunning("recompute", account, database_url=database_url)
    assert done.returncode == 0, done.stderr
    assert f"account {account}: past_due / level restrict_premium" in done.stdout
    assert "outcome: changed; version 1" in done.stdout
    assert "level.restrict_premium" in done.stdout and "reasons:" in done.stdout

    again = dunning("recompute", account, "--json", database_url=database_url)
    summary = json.loads(again.stdout)
    assert summary["outcome"] == "unchanged" and summary["changed_fields"] == [] and summary["events"] == []
    assert summary["trigger"] == "MANUAL"


def test_recompute_of_an_unknown_account_is_a_clear_error(database_url, clean):
    done = dunning("recompute", "acct_nobody", database_url=database_url)
    assert done.returncode == 2
    assert "acct_nobody" in done.stderr and "Traceback" not in done.stderr


def test_invalid_policy_and_missing_configuration_name_the_problem(database_url, tmp_path: Path):
    bad = tmp_path / "policy.toml"
    bad.write_text(DEFAULT_POLICY.read_text().replace("small_balance_threshold = 500", "small_balance_threshold = -5"))
    done = dunning("recompute", "acct_x", database_url=database_url, DUNNING_POLICY=str(bad))
    assert done.returncode == 2
    assert "policy key 'consequences.small_balance_threshold'" in done.stderr and "Traceback" not in done.stderr
    missing = dunning("db", "upgrade", database_url="")
    assert missing.returncode == 2 and "DATABASE_URL is not set" in missing.stderr


def test_db_upgrade_migrates_an_empty_database(empty_database):
    from sqlalchemy import create_engine

    done = dunning("db", "upgrade", database_url=empty_database)
    assert done.returncode == 0, done.stderr
    assert "database upgraded to head" in done.stdout
    probe = create_engine(empty_database)
    with probe.connect() as conn:
        tables = {r[0] for r in conn.exec_driver_sql("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
    probe.dispose()
    assert {"subs_account", "subs_customer", "subs_dunning", "subs_mandate", "subs_stuck_events", "stripe_event",
            "outbox"} <= tables


def test_an_operators_mistakes_get_a_message_not_a_traceback(empty_database):
    """A database not migrated yet, an unknown revision, a driver this project does not ship, a port
    that is not a number, a negative count: each named, exit code 2."""
    cases = [
        (("recompute", "acct_x"), empty_database, "run `dunning db upgrade` first"),
        (("db", "upgrade", "nonexistent"), empty_database, "Can't locate revision"),
        (("recompute", "acct_x"), empty_database.replace("postgresql+psycopg2://", "postgresql+asyncpg://"),
         "for psycopg2"),
        (("recompute", "acct_x"), "postgresql://h:abc/x", "DATABASE_URL cannot be read"),
        (("rollout", "status", "--history", "-1"), empty_database, "-1 is negative"),
        (("recompute", "acct_x"), empty_database, "CELERY_VISIBILITY_TIMEOUT must be at least 185 seconds"),
        # bytes that are not UTF-8 (the shell's $'\xff'): Python keeps them as surrogates nothing can encode
        (("recompute", "\udcff"), empty_database, "argument 2 (b'\\xff') is not UTF-8 text"),
        (("rollout", "name", "acct_1", "\udcff", "--reason", "r"), empty_database,
         "argument 4 (b'\\xff') is not UTF-8"),
        # numbers no SQL integer holds
        (("sweep", "--batch-size", "99999999999999999999"), empty_database, "must be at most 100000 accounts"),
        (("rollout", "status", "--history", "99999999999999999999"), empty_database, "is more than 100000"),
        (("sweep", "--dry-run", "--show", "99999999999999999999"), empty_database, "is more than 100000"),
        (("report", "bad-debt", "--since", "2026-10-02", "--until", "2026-10-01"), empty_database,
         "--until (2026-10-01, the day after the last one) must be after --since (2026-10-02)"),
    ]
    for args, url, message in cases:
        extra = {"CELERY_VISIBILITY_TIMEOUT": "0"} if "VISIBILITY" in message else {}
        done = dunning(*args, database_url=url, **extra)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)


def test_a_database_that_takes_the_connection_and_never_answers_fails_the_command_in_seconds():
    """A hung server (or a firewall dropping after the handshake): the schema check before the
    command is bound by the connect timeout too, and the command says the database is unreachable."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]
        done = dunning("recompute", "acct_x", database_url=f"postgresql://postgres@127.0.0.1:{port}/x")
    assert done.returncode == 3, done.stderr
    assert "database unreachable" in done.stderr and "Traceback" not in done.stderr


def test_db_upgrade_against_a_database_that_never_answers_fails_in_seconds_not_never():
    """`dunning db upgrade` (a release step, an init container) connects through Alembic's engine,
    which had no connect timeout: against a server that takes the connection and never answers it
    waited forever. It is bound as every other command is, and says the database is unreachable."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]
        url = f"postgresql://postgres@127.0.0.1:{port}/x"
        upgrade = dunning("db", "upgrade", database_url=url)  # before: subprocess.TimeoutExpired (120 s)
        downgrade = dunning("db", "downgrade", "-1", database_url=url)
    for done in (upgrade, downgrade):
        assert done.returncode == 3, done.stderr[-400:]
        assert "database unreachable" in done.stderr and "timeout expired" in done.stderr
        assert "Traceback" not in done.stderr


def test_a_database_older_than_the_code_says_to_upgrade_it(empty_database):
    """After a downgrade (or an upgrade that was skipped) a query names a column the database does not
    have yet (UndefinedColumn, 42703): a message saying what to run, not a traceback."""
    from sqlalchemy import create_engine

    assert dunning("db", "upgrade", database_url=empty_database).returncode == 0
    assert dunning("db", "downgrade", "-1", database_url=empty_database).returncode == 0
    from app.migrate import revisions_missing

    probe = create_engine(empty_database)
    with probe.connect() as conn:
        missing = revisions_missing(conn)
    assert missing is not None, "the database is at a revision this code does not know"
    [newest] = missing
    probe.dispose()
    for command in (("recompute", "acct_x"), ("report", "bad-debt", "--since", "2026-10-01"), ("sweep", "--dry-run"),
                    ("rollout", "status")):
        older = dunning(*command, database_url=empty_database)
        assert older.returncode == 2, (command, older.stderr)
        assert older.stderr == ("error: the database schema is older than this code (1 migration not applied, the "
                                f"newest {newest}): run `dunning db upgrade` first\n"), command

    assert dunning("db", "upgrade", database_url=empty_database).returncode == 0
    probe = create_engine(empty_database)
    with probe.begin() as conn:  # a column every recompute reads, as an older schema would lack it
        conn.exec_driver_sql("ALTER TABLE subs_account DROP COLUMN bad_debt")
    probe.dispose()
    done = dunning("recompute", "acct_x", database_url=empty_database)
    assert done.returncode == 2, done.stderr
    assert "the database schema is older than this code (column a.bad_debt does not exist): " \
           "run `dunning db upgrade` first" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_reader_that_goes_away_ends_the_command_quietly(client, accounts: Accounts, database_url):
    """`dunning recompute ACCOUNT | head -2`: the reader closes the pipe; the command stops as command-line
    tools do (status 141, as by SIGPIPE), with no BrokenPipeError on stderr."""
    account, _customer = accounts.create()
    read_end, write_end = os.pipe()
    os.close(read_end)  # gone before anything is written: every write fails with EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "app.cli", "recompute", account, "--json"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120,
                              env={**os.environ, "DATABASE_URL": database_url})
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert done.stderr == ""


def test_a_metrics_folder_it_cannot_write_does_not_stop_the_recompute(client, accounts: Accounts, database_url,
                                                                     engine, tmp_path: Path):
    """`dunning recompute` counts its run into PROMETHEUS_MULTIPROC_DIR (da6a62a). Before, a folder it
    could not write (a typo, the worker's folder on a host without it, one owned by the worker's user)
    failed the command with a traceback before it recomputed anything (prometheus_client opens its
    files when app.metrics is imported, which building the command's parser does). The recompute is
    the command's work: it runs, prints its decision, and says its run was not counted. (A path
    under a regular file stands for any folder the command cannot write: the tests may run as root,
    whom a read-only mode does not stop.)"""
    account, customer = accounts.create()
    post_event(client, event("invoice.payment_failed", customer=customer, created=int(time.time()) - 8 * 86400))
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    done = dunning("recompute", account, "--json", database_url=database_url,
                   PROMETHEUS_MULTIPROC_DIR=str(not_a_folder / "metrics"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outcome"] == "changed"
    assert "Traceback" not in done.stderr
    assert "not counted" in done.stderr and "PROMETHEUS_MULTIPROC_DIR" in done.stderr

    # Unset: counted in the command's own process only; no error, and no metrics files.
    env = {k: v for k, v in os.environ.items() if k.lower() != "prometheus_multiproc_dir"}
    again = subprocess.run([sys.executable, "-m", "app.cli", "recompute", account, "--json"], capture_output=True,
                           text=True, env={**env, "DATABASE_URL": database_url}, cwd=tmp_path, timeout=120)
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert json.loads(again.stdout)["outcome"] == "unchanged"
    assert [p for p in tmp_path.iterdir() if p.suffix == ".db"] == []



def test_db_upgrade_of_a_database_a_newer_release_migrated_leaves_it_and_succeeds(empty_database):
    """A rollback: the older release's `dunning db upgrade` (the migrate Job, the web and worker pods'
    init container) meets a database at a revision only the newer code has. Every other command
    runs on it (a newer schema is not this code's to judge, app/migrate.revisions_missing), but the
    upgrade failed with Alembic's "Can't locate revision" (status 2): the rolled-back pods never
    started. It leaves the database as it is, says so, and succeeds; naming a revision still fails."""
    from sqlalchemy import create_engine

    assert dunning("db", "upgrade", database_url=empty_database).returncode == 0
    probe = create_engine(empty_database)
    with probe.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'f00dfeed0001'")
    done = dunning("db", "upgrade", database_url=empty_database)
    assert done.returncode == 0, done.stderr
    assert ("the database is at revision f00dfeed0001, which this code does not have (a newer release "
            "migrated it): left as it is") in done.stderr
    assert "Traceback" not in done.stderr
    named = dunning("db", "upgrade", "head", database_url=empty_database)
    assert named.returncode == 0, named.stderr
    explicit = dunning("db", "upgrade", "+1", database_url=empty_database)
    assert explicit.returncode == 2 and "f00dfeed0001" in explicit.stderr, explicit.stderr
    with probe.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "f00dfeed0001"
    probe.dispose()
