"""The `dunning` command at its edges (real subprocesses): a malformed setting, a busy account, an
unreadable file is one `error:` line naming the problem and a non-zero status, never a traceback,
and never a secret."""

from __future__ import annotations

import pytest

from tests.conftest import Accounts
from tests.integration.test_cli_recompute import dunning

PASSWORD = "s3cr3t-pw"


def test_a_database_url_without_a_scheme_is_an_error_that_does_not_print_the_password():
    """A mistyped URL (its ':' dropped) is refused by name; the message never holds the value."""
    done = dunning("db", "upgrade", database_url=f"postgresql//dunning:{PASSWORD}@db.internal/dunning")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: DATABASE_URL must be a PostgreSQL URL"), done.stderr
    assert PASSWORD not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(("url", "reason"), [
    ("postgresql://postgres@127.0.0.1:99999999999999999999/x", "port must be a number from 1 to 65535"),
    ("postgresql://postgres@127.0.0.1:-1/x", "port must be a number from 1 to 65535"),
    ("postgresql://postgres@127.0.0.1/x?sslmode=bogus", "sslmode must be one of"),
    ("postgresql://postgres@127.0.0.1/x?connect_timeot=3", "an option PostgreSQL does not know: 'connect_timeot'"),
    # not checked by Settings: libpq's own reason when it connects
    ("postgresql://postgres@127.0.0.1/x?target_session_attrs=foo",
     'DATABASE_URL cannot be used: invalid target_session_attrs value: "foo"'),
])
def test_a_port_or_option_libpq_refuses_is_an_error_naming_it_not_a_traceback(url, reason):
    """libpq refused these only when it connected: psycopg2's exception went through as a traceback."""
    done = dunning("recompute", "acct_x", database_url=url)
    assert done.returncode == 2, done.stderr[-400:]
    assert done.stderr.startswith("error: DATABASE_URL") and reason in done.stderr, done.stderr[-400:]


def test_recompute_of_an_account_another_process_is_recomputing_says_so_and_fails(
        database_url, engine, accounts: Accounts):
    """The account's recompute lock held past lock_timeout (5 s; a worker mid-recompute, or stuck):
    psycopg2's LockNotAvailable was a traceback. It is a message naming the account, status 1 (as
    `dunning sweep` when another sweep runs: nothing done, try again)."""
    account, _customer = accounts.create()
    holder = engine.connect()
    try:
        holder.exec_driver_sql("SELECT pg_advisory_lock(hashtextextended(%(a)s, 7281))", {"a": account})
        holder.commit()
        done = dunning("recompute", account, database_url=database_url)
    finally:
        holder.exec_driver_sql("SELECT pg_advisory_unlock_all()")
        holder.commit()
        holder.close()
    assert done.returncode == 1, done.stderr[-400:]
    assert done.stderr == (f"error: account {account!r} is being recomputed by another process (lock wait timed "
                           f"out); try again\n"), done.stderr[-400:]
    assert dunning("recompute", account, database_url=database_url).returncode == 0  # once it is free


def test_any_command_whose_statement_timed_out_says_try_again(monkeypatch, capsys):
    """The same for every other command (a lock held by another transaction, a statement past
    statement_timeout): a message and status 1, not a traceback."""
    from app import cli
    from app.db import TimedOut

    def timed_out(_args: object) -> int:
        raise TimedOut("canceling statement due to lock timeout")

    monkeypatch.setattr(cli, "cmd_report_bad_debt", timed_out)
    assert cli.main(["report", "bad-debt", "--since", "2026-01-01"]) == 1
    assert capsys.readouterr().err == f"error: {cli.TIMED_OUT}\n"


@pytest.mark.parametrize("command", [("process", "web"), ("run",)])
def test_a_procfile_that_is_not_utf8_is_an_error_naming_dunning_procfile(tmp_path, database_url, command):
    """`dunning process` (status 2) and `dunning run` (status 1, its own failures' status) printed a
    UnicodeDecodeError traceback."""
    procfile = tmp_path / "Procfile"
    procfile.write_bytes(b"web: echo caf\xe9\n")
    extra = ("--data-dir", str(tmp_path / "data")) if command == ("run",) else ()
    done = dunning(*command, *extra, database_url=database_url, DUNNING_PROCFILE=str(procfile))
    assert done.returncode == (1 if command == ("run",) else 2), done.stderr[-400:]
    assert f"error: DUNNING_PROCFILE names {procfile}, which cannot be read: it is not UTF-8 text" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", [("db", "upgrade"), ("recompute", "acct_x")])
def test_a_database_that_does_not_exist_is_named_with_libpqs_reason_not_only_unreachable(database_url, command):
    """The server answered, but the database in DATABASE_URL does not exist (a typo, not created
    yet): the message said only `database unreachable (OperationalError)`, which sends the operator
    to the network. It carries libpq's reason (never the password, which libpq does not repeat)."""
    from sqlalchemy.engine import make_url

    missing = make_url(database_url).set(database="dunning_no_such_db", password=PASSWORD)
    done = dunning(*command, database_url=missing.render_as_string(hide_password=False))
    assert done.returncode == 3, done.stderr[-400:]
    assert done.stderr.startswith("error: database unreachable ("), done.stderr
    assert 'database "dunning_no_such_db" does not exist' in done.stderr
    assert done.stderr.rstrip().endswith("; check DATABASE_URL")
    assert PASSWORD not in done.stderr and "Traceback" not in done.stderr


def test_ctrl_c_while_the_command_starts_exits_130_without_a_traceback():
    """Ctrl-C in the first second, while the command builds its parser (importing Celery and the
    rest takes most of its start): it was caught only around the command's own work, so it printed
    a KeyboardInterrupt traceback. A real SIGINT, raised at that moment."""
    import os
    import subprocess
    import sys

    from tests.integration.test_cli_recompute import ROOT

    script = ("import signal, sys\n"
              "from app import cli\n"
              "build = cli.build_parser\n"
              "def interrupted():\n"
              "    signal.raise_signal(signal.SIGINT)\n"
              "    return build()\n"
              "cli.build_parser = interrupted\n"
              "sys.exit(cli.main(['rollout', 'status']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x"})
    assert done.returncode == 130, done.stderr[-400:]
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr


@pytest.mark.parametrize(("command", "revision"), [
    ("upgrade", ""), ("upgrade", "@"), ("downgrade", ""), ("downgrade", "@"), ("downgrade", "head@"),
])
def test_a_revision_that_names_none_is_an_error_not_an_assertion_traceback(empty_database, command, revision):
    """Alembic resolves an empty revision (nothing, or nothing after a branch's '@') with a bare
    assert: `dunning db upgrade ""` (an unset variable in a deploy script) was an AssertionError
    traceback, where any other unknown revision is one line naming it."""
    done = dunning("db", command, revision, database_url=empty_database)
    assert done.returncode == 2, done.stderr[-400:]
    assert done.stderr.startswith("error: migration: ") and "names no revision" in done.stderr, done.stderr[-400:]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("revision", ["head+1", "base+1000", "0001-1", "request_created_at+1000"])
def test_a_revision_counted_past_the_newest_is_an_error_not_an_assertion_traceback(empty_database, revision):
    """Alembic resolves a relative revision that counts past the newest migration (head+1, or from
    an id: an upgrade to one more than there are) with a bare assert too: an AssertionError traceback
    (status 1) where `+100` and an unknown id are one `error: migration:` line (status 2). The
    database is left as it was."""
    assert dunning("db", "upgrade", "request_created_at", database_url=empty_database).returncode == 0
    done = dunning("db", "upgrade", revision, database_url=empty_database)
    assert done.returncode == 2, done.stderr[-400:]
    assert done.stderr.startswith("error: migration: ") and revision in done.stderr, done.stderr[-400:]
    assert "Traceback" not in done.stderr and "AssertionError" not in done.stderr
    assert dunning("db", "upgrade", "request_created_at", database_url=empty_database).returncode == 0  # still there


HOSTILE_ARGUMENTS = [
    ["recompute", ""], ["recompute", "x" * 100_000], ["recompute", "acct_\u00e9"],
    ["report", "bad-debt", "--since", "9999-12-31"], ["report", "bad-debt", "--since", "2026-02-30"],
    ["report", "bad-debt", "--since", "2026-01-01", "--until", "2025-12-31"],
    ["sweep", "--dry-run", "--batch-size", "9" * 5000], ["sweep", "--dry-run", "--batch-size", "\u00b2"],
    ["sweep", "--dry-run", "--show", "-1"],
    ["rollout", "status", "--history", "\u00b2"], ["rollout", "hold", "--reason", " "],
    ["rollout", "hold", "--reason", "r", "--actor", ""], ["rollout", "hold", "--reason", "r" * 3000],
    ["rollout", "hold", "--reason", "r", "--from", "x" * 10_000],
    ["rollout", "hold", "--reason", "r", "--revision", "-1"],
    ["rollout", "advance", "--reason", "r"], ["rollout", "name", "--reason", "r", "--actor", " ", "a" * 50_000],
    ["outbox", "list", "--limit", "9" * 5000], ["outbox", "list", "--account", "x" * 100_000],
    ["outbox", "skip", "9" * 5000, "--actor", "a", "--reason", "r"],
    ["outbox", "skip", "1", "--actor", " ", "--reason", "r"],
    ["db", "upgrade", ""], ["db", "upgrade", "@"], ["db", "upgrade", "a:b"], ["db", "downgrade", "x" * 1000],
    ["db", "downgrade", "head@"], ["db", "upgrade", "head+1"], ["process", ""],
]


@pytest.mark.parametrize("arguments", HOSTILE_ARGUMENTS, ids=lambda a: " ".join(x[:12] for x in a))
def test_hostile_arguments_are_a_message_and_a_status_never_a_traceback(cli_env, clean, request, monkeypatch, capsys,
                                                                      arguments):
    """Every command, in process, with the arguments an operator or a script can get wrong: an
    argparse usage error (status 2) or the command's own `error:` line, never an exception."""
    from app.cli import main

    if arguments[0] == "db":  # nothing to migrate by mistake: a database of its own
        monkeypatch.setenv("DATABASE_URL", request.getfixturevalue("empty_database"))
    status: int | str | None
    try:
        status = main(arguments)
    except SystemExit as usage:  # argparse: its usage line and the argument it refused
        status = usage.code
    err = capsys.readouterr().err
    assert status in (0, 1, 2), (status, err[-400:])
    assert "Traceback" not in err and (status == 0 or "error" in err), err[-400:]


@pytest.mark.parametrize("redirect", [">&-", ">/dev/full"])
def test_output_that_cannot_be_written_is_one_error_line_not_a_traceback(database_url, redirect):
    """Standard output closed (`dunning ... >&-`, a daemon's closed descriptor) was an AttributeError
    traceback (Python leaves sys.stdout None); written to a full disk (`> /dev/full`, a cron job's
    log file) an OSError traceback. Either is one line saying the output could not be written,
    status 1, as a closed pipe is handled quietly."""
    import os
    import subprocess
    import sys

    from tests.integration.test_cli_recompute import ROOT

    done = subprocess.run(["sh", "-c", f'exec "$@" {redirect}', "sh", sys.executable, "-m", "app.cli",
                           "rollout", "status"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "DATABASE_URL": database_url})
    assert done.returncode == 1, done.stderr[-600:]
    assert done.stderr.startswith("error: the output could not be written ("), done.stderr[-600:]
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr[-600:]


def test_ctrl_c_while_a_statement_waits_on_a_lock_exits_130_not_try_again(database_url, engine, accounts: Accounts):
    """Ctrl-C while `dunning recompute` waits for the account's lock (a worker mid-recompute): libpq
    waits on in C until lock_timeout cancels the statement, and then the command stops with status
    130, as README says of Ctrl-C, not `error: ... try again` (status 1) as if nobody had pressed it."""
    import os
    import signal
    import subprocess
    import sys

    from tests.integration.test_cli_recompute import ROOT

    account, _customer = accounts.create()
    holder = engine.connect()
    try:
        holder.exec_driver_sql("SELECT pg_advisory_lock(hashtextextended(%(a)s, 7281))", {"a": account})
        holder.commit()
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "recompute", account], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "DATABASE_URL": database_url})
        try:
            waiting = 0
            while waiting == 0 and proc.poll() is None:  # until its statement waits for the lock
                waiting = holder.exec_driver_sql(
                    "SELECT count(*) FROM pg_locks w JOIN pg_locks h USING (locktype, classid, objid, objsubid) "
                    "WHERE w.locktype = 'advisory' AND NOT w.granted AND h.pid = pg_backend_pid()").scalar_one()
                holder.commit()
            proc.send_signal(signal.SIGINT)
            _out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        holder.exec_driver_sql("SELECT pg_advisory_unlock_all()")
        holder.commit()
        holder.close()
    assert proc.returncode == 130, err[-400:]
    assert "try again" not in err and "Traceback" not in err, err[-400:]


@pytest.mark.parametrize("revision", ["base", "0001"])
def test_db_upgrade_to_a_revision_behind_the_database_says_it_left_it_not_upgraded_to_it(database_url, revision):
    """`dunning db upgrade base` (or any revision older than the database's) migrates nothing, since
    alembic's upgrade only goes forward, yet it said `database upgraded to base`, status 0: a
    rollback script meaning to go back was told it had. An error naming where the database is and
    the command that goes back, status 2, the database as it was."""
    from tests.integration.test_cli_recompute import dunning

    done = dunning("db", "upgrade", revision, database_url=database_url)
    assert done.returncode == 2, (done.stdout, done.stderr[-400:])
    assert done.stderr.startswith("error: migration: the database is at revision "), done.stderr[-400:]
    assert f"`dunning db downgrade {revision}`" in done.stderr and "Traceback" not in done.stderr
    assert "upgraded" not in done.stdout
    assert dunning("recompute", "acct_nobody", database_url=database_url).returncode == 2  # still at head: no account
