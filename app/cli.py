"""The ``dunning`` command: database migrations, one-off recomputes, reports, the local fleet, and one
process of the Procfile (what deployments run)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from app.config import ConfigError, Settings
from app.log_safety import install as install_log_safety
from app.policy_file import PolicyFileError

if TYPE_CHECKING:
    from app.runtime import Runtime

Handler = Callable[[argparse.Namespace], int]

# Exit status of a command that found what it works on busy (a lock held by another process), as
# `dunning sweep` does when another sweep runs: nothing was done, and the same command later works.
BUSY = 1
TIMED_OUT = ("the database did not answer in time (a lock held by another transaction, or a statement past its "
             "time limit); nothing was changed, try again")


def _settings() -> Settings:
    return Settings.from_env()


def cli_runtime() -> Runtime:
    """The runtime of a command that works on the product's tables, once the database is known to
    have every migration of this code: on an older schema a command would fail half-way on a
    missing column, or work on a table whose meaning changed."""
    from app.migrate import require_current_schema
    from app.runtime import Runtime

    rt = Runtime.build(_settings())
    with rt.engine.connect() as conn:
        require_current_schema(conn)
    return rt


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from app.migrate import upgrade

    unknown = upgrade(_settings().database_url, args.revision)
    if unknown:
        print(f"the database is at revision {', '.join(unknown)}, which this code does not have (a newer release "
              "migrated it): left as it is", file=sys.stderr)
        return 0
    ahead = _past(_settings().database_url, args.revision)
    if ahead:
        print(f"error: migration: the database is at revision {', '.join(ahead)}, past {args.revision}: "
              f"`dunning db upgrade` only migrates forward and left it as it is (`dunning db downgrade "
              f"{args.revision}` migrates back)", file=sys.stderr)
        return 2
    print(f"database upgraded to {args.revision}")
    return 0


def _past(database_url: str, revision: str) -> list[str]:
    """The database's revisions when, after an upgrade to ``revision``, it is not at ``revision``:
    alembic's upgrade to a revision older than the database's (`base` included) does nothing and
    says nothing. [] when it is there, or for what names no one revision (head, +1, a branch)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError
    from sqlalchemy import create_engine, make_url, pool

    from app.migrate import MIGRATIONS

    if revision in ("head", "heads") or "@" in revision or revision[:1] in "+-":
        return []
    try:
        wanted = {script.revision for script in ScriptDirectory(str(MIGRATIONS)).get_revisions(revision)
                  if script is not None}
    except CommandError:
        return []
    url = make_url(database_url)
    engine = create_engine(url, poolclass=pool.NullPool,
                           connect_args={} if "connect_timeout" in url.query else {"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
    finally:
        engine.dispose()
    return sorted(current) if current != wanted else []


def cmd_db_downgrade(args: argparse.Namespace) -> int:
    from app.migrate import downgrade

    downgrade(_settings().database_url, args.revision)
    print(f"database downgraded to {args.revision}")
    return 0


def cmd_recompute(args: argparse.Namespace) -> int:
    from app.db import is_timed_out
    from app.money import facts_shown, owed
    from app.recompute.observe import observe
    from app.recompute.service import AccountNotFound, run_recompute

    rt = cli_runtime()
    try:
        # No moment passed: the clock is read once the account's lock is held, as the task does.
        result = run_recompute(rt.engine, rt.policy, args.account_id, "MANUAL")
    except AccountNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not is_timed_out(exc):
            raise
        print(f"error: {_busy_account(args.account_id, exc)}", file=sys.stderr)
        return BUSY
    # Counted as the task counts its runs (bad-debt entries and exits, time in bad debt, events): in
    # the folder PROMETHEUS_MULTIPROC_DIR names, when set (the worker's, for its endpoint to show).
    observe(result)
    summary = result.summary()
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(f"account {summary['account_id']}: {summary['status']} / level {summary['level']}"
          f" (failure class {summary['failure_class'] or '-'}, next retry {summary['next_retry_at'] or '-'})")
    # In major units of each currency (app/money.py); --json keeps Stripe's integer minor units.
    print(f"outstanding: {owed(summary.get('outstanding'))}")
    changed = summary.get("changed_fields") or []
    print(f"outcome: {result.outcome}; version {summary.get('version')}; "
          f"changed: {', '.join(changed) or 'nothing'}; events: {', '.join(summary.get('events') or []) or 'none'}")
    print("reasons:")
    for reason in summary["reasons"]:
        facts = ", ".join(f"{k}={v}" for k, v in facts_shown(reason["facts"]).items() if k != "rule")
        print(f"  - {reason['rule']}: {reason['detail']}" + (f" [{facts}]" if facts else ""))
    return 0


def _busy_account(account_id: str, exc: Exception) -> str:
    # The account's recompute lock (service.LOCK_AND_TAKE_SQL) waits at most lock_timeout (5 s) for
    # a worker's recompute of it, or another command's; any other wait is on a row someone writes.
    if "pg_advisory_xact_lock" in (getattr(exc, "statement", None) or ""):
        return f"account {account_id!r} is being recomputed by another process (lock wait timed out); try again"
    return f"account {account_id!r}: {TIMED_OUT}"


def cmd_report_bad_debt(args: argparse.Namespace) -> int:
    from app.reports.bad_debt import BadDate, lines, parse_day, render

    try:
        since = parse_day(args.since)
        until = parse_day(args.until, "--until") if args.until else None
    except BadDate as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if until is not None and until <= since:
        print(f"error: --until ({args.until}, the day after the last one) must be after --since ({args.since})",
              file=sys.stderr)
        return 2
    with cli_runtime().engine.connect() as conn:
        print(render(lines(conn, since, until), since), end="")
    return 0


def cmd_process(args: argparse.Namespace) -> int:
    """Become one process of the Procfile, as deployments run them (deploy/): the Procfile stays the
    one place that says how each process starts, metrics directories included."""
    from app.launcher import (
        LaunchError,
        check_process_port,
        check_web_settings,
        flower_api_env,
        procfile_processes,
        programs_path,
        web_env,
    )

    given: dict[str, str] = {}
    try:
        processes = procfile_processes(os.environ)
        if args.name == "flower":
            # As `dunning run` checks: beyond loopback, Flower without a login shows every task's
            # arguments and results to anyone who can reach it (its API is closed by the Procfile).
            port = os.environ.get("FLOWER_PORT", "").strip()  # for the message only
            # As `dunning run` gives it: an IPv6 address as a URL writes it ([::1]) is the bare address
            # to bind (Tornado's getaddrinfo found no host '[::1]': a traceback), blanks dropped.
            address = os.environ.get("FLOWER_ADDRESS", "").strip().strip("[]")
            if address:
                given["FLOWER_ADDRESS"] = address
            flower_api_env(os.environ, address or "127.0.0.1",
                           int(port) if port.isascii() and port.isdigit() else 5555)  # '²' is no int()
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = processes.get(args.name)
    if command is None:
        print(f"error: the Procfile has no process {args.name!r} (it has {', '.join(processes)})", file=sys.stderr)
        return 2
    if args.name in FLEET_PROCESSES:
        # Each reads the settings and the policy file at its start: checked here, as `dunning run`
        # does, a wrong one is one line naming it (ConfigError, PolicyFileError: main), not the end
        # of a gunicorn or Celery traceback (gunicorn's once per worker, then "Worker failed to boot").
        _check_process_settings()
    check_process_port(os.environ, args.name)
    if args.name == "web":
        check_web_settings(os.environ)  # else gunicorn's traceback, or a web process that answers nothing
    env = {**web_env(os.environ), **given, "PATH": programs_path(os.environ.get("PATH", ""))}
    sys.stdout.flush()
    os.execvpe("sh", ["sh", "-c", command], env)  # the line itself execs its program: signals reach it


FLEET_PROCESSES = ("web", "worker", "beat", "flower")  # the Procfile's, each builds the Celery app


def _check_process_settings() -> None:
    from app.history.prune import check_retention
    from app.policy_file import load_policy

    settings = _settings()
    check_retention(settings.history_retention_days, load_policy(settings.policy_path))


def cmd_run(args: argparse.Namespace) -> int:
    from app.launcher import main as launch

    return launch(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dunning", description="The dunning recompute fleet.")
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database schema (Alembic)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser("upgrade", help="migrate to the newest schema")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(handler=cmd_db_upgrade)
    down = db_sub.add_parser("downgrade", help="migrate back to REVISION")
    down.add_argument("revision")
    down.set_defaults(handler=cmd_db_downgrade)

    rc = sub.add_parser("recompute", help="recompute one account now and print the decision")
    rc.add_argument("account_id")
    rc.add_argument("--json", action="store_true", help="print the result as JSON")
    rc.set_defaults(handler=cmd_recompute)

    report = sub.add_parser("report", help="reports")
    report_sub = report.add_subparsers(dest="report_command", required=True)
    bad_debt = report_sub.add_parser("bad-debt", help="bad-debt entries and exits per day, by why and product")
    bad_debt.add_argument("--since", required=True, help="first day, YYYY-MM-DD (UTC)")
    bad_debt.add_argument("--until", default=None, help="day after the last one, YYYY-MM-DD (UTC)")
    bad_debt.set_defaults(handler=cmd_report_bad_debt)

    run = sub.add_parser("run", help="run the whole fleet (embedded PostgreSQL/Redis unless configured)")
    run.add_argument("--data-dir", default=None, help="where the private servers keep their data (.dunning)")
    run.set_defaults(handler=cmd_run)

    process = sub.add_parser("process", help="run one process of the Procfile in the foreground "
                             "(web, worker, beat, flower), as a container does")
    process.add_argument("name")
    process.set_defaults(handler=cmd_process)

    from app.history.cli import add_commands as add_history_commands
    from app.outbox.cli import add_commands as add_outbox_commands
    from app.sweep.cli import add_commands as add_sweep_commands

    add_sweep_commands(sub)
    add_outbox_commands(sub)
    add_history_commands(sub)
    return parser


METRICS_FOLDER = "PROMETHEUS_MULTIPROC_DIR"


def _unusable_metrics_folder_left_out() -> None:
    """A command counts what it does (`dunning recompute` its run, the sweep and the prune theirs)
    into the folder PROMETHEUS_MULTIPROC_DIR names, where prometheus_client opens its files as soon
    as app.metrics is imported (building the parser imports it). A folder this command cannot write
    (a typo, the worker's folder on a host without it, or owned by the worker's user) failed every
    command with a traceback before it did anything: the command's work matters more than its count.
    Such a setting is said on stderr and left out of this process (counted in memory only, as when
    unset). Empty counts as unset (app.metrics.registry reads it so; prometheus_client would write
    into the working directory). Before prometheus_client is imported, which reads it once."""
    names = [n for n in (METRICS_FOLDER, METRICS_FOLDER.lower()) if n in os.environ]
    if not names:
        return
    folder = os.environ[names[0]]
    if folder and os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK):
        return
    for name in names:
        del os.environ[name]
    if folder:
        print(f"warning: {METRICS_FOLDER}={folder!r} is not a folder this command can write: "
              "its metrics are not counted there", file=sys.stderr)


class OutputFailed(OSError):
    """Standard output could not be written (a full disk, an I/O error); a closed pipe is
    BrokenPipeError, handled quietly. An OSError still, for code that handles its output's (the
    launcher's)."""


class _Output:
    """sys.stdout, its write failures (other than a closed pipe) raised as OutputFailed: told from
    any other OSError of the command, they are said in one line instead of a traceback."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputFailed(exc.errno, exc.strerror or exc.__class__.__name__) from exc

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputFailed(exc.errno, exc.strerror or exc.__class__.__name__) from exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _output_lost() -> None:
    # What is still buffered goes to /dev/null at exit, not to the failed output (which would print
    # Python's "Exception ignored" lines and change the status).
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    if sys.stdout is None:  # started with its standard output closed (`>&-`): print() would lose it all
        print("error: the output could not be written (standard output is closed)", file=sys.stderr)
        return 1
    for n, arg in enumerate(arguments, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:  # bytes the locale could not decode, kept as surrogates
            shown = arg.encode("utf-8", "surrogateescape")
            print(f"error: argument {n} ({shown!r}) is not UTF-8 text (account ids, names and reasons are UTF-8)",
                  file=sys.stderr)
            return 2
    _unusable_metrics_folder_left_out()
    try:
        parser = build_parser()  # most of the command's start: it imports Celery and the rest
        args = parser.parse_args(arguments)
    except KeyboardInterrupt:  # Ctrl-C right away: as during the command, no traceback
        return 130
    handler: Handler = args.handler
    # The command's log (Python's last-resort handler: warnings and errors, to stderr): values
    # interpolated into a record escaped and capped (app/log_safety.py).
    install_log_safety(loggers=[""])
    stdout = sys.stdout
    sys.stdout = _Output(stdout)  # its write failures told apart
    try:
        return _handle(handler, args)
    finally:
        sys.stdout = stdout  # as it was, for a caller in this process


def _handle(handler: Handler, args: argparse.Namespace) -> int:
    """The command, its failures that are the caller's to fix said in one line (main)."""
    try:
        code = handler(args)
        sys.stdout.flush()  # here, so that a closed pipe (`| head`) is handled below, not at exit
        return code
    except BrokenPipeError:
        # The reader went away (`dunning ... | head -2`): stop quietly, as command-line tools do.
        # Python's own final flush of what is still buffered then writes to /dev/null, not the pipe.
        _output_lost()
        return 128 + 13  # as if killed by SIGPIPE
    except OutputFailed as exc:  # `> /dev/full`: whatever the command did is done; its report is lost
        _output_lost()
        print(f"error: the output could not be written ({exc.strerror})", file=sys.stderr)
        return 1
    except (ConfigError, PolicyFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from app.db import is_connection_error, is_timed_out
        from app.migrate import MigrationBlocked

        if isinstance(exc, MigrationBlocked):  # `db upgrade`, `make run`: a table another transaction holds
            print(f"error: migration: {exc}", file=sys.stderr)
            return BUSY
        if is_timed_out(exc):
            print(f"error: {TIMED_OUT}", file=sys.stderr)
            return BUSY
        # libpq's complaint about an option is worded like a failed connection ("connection to
        # server at ... failed: invalid integer value ..."), but it is the URL that needs fixing.
        problem = _known_problem(exc)
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        if is_connection_error(exc):
            print(f"error: database unreachable ({_unreachable_reason(exc)}); check DATABASE_URL", file=sys.stderr)
            return 3
        raise


def _unreachable_reason(exc: Exception) -> str:
    """libpq's reason for a connection that failed (refused, no such host, and when the server
    answered: no such database or role, authentication failed), which names what to fix, else the
    exception's class. libpq's words name the host, port, user and database, never the password."""
    import psycopg2
    from sqlalchemy.exc import DBAPIError

    driver = exc.orig if isinstance(exc, DBAPIError) else exc
    if not isinstance(driver, psycopg2.OperationalError) or getattr(driver, "pgcode", None) is not None:
        return exc.__class__.__name__
    reason = " ".join(str(driver).split())
    if not reason:
        return exc.__class__.__name__
    return reason if len(reason) <= 300 else reason[:297] + "..."


def _known_problem(exc: Exception) -> str | None:
    """A message for a failure that is the caller's to fix, or None (a bug: the traceback shows)."""
    from alembic.util import CommandError
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, ProgrammingError

    if isinstance(exc, CommandError):  # an unknown revision, for one
        return f"migration: {exc}"
    orig = exc.orig if isinstance(exc, ProgrammingError) else None
    pgcode = getattr(orig, "pgcode", None)
    if pgcode == "42P01":  # undefined_table
        return "the database has no schema yet, or an older one than this code: run `dunning db upgrade` first"
    if pgcode == "42703":  # undefined_column: a schema older than the code (a downgrade, a skipped upgrade)
        diag = getattr(orig, "diag", None)
        detail = getattr(diag, "message_primary", None) or "a column is missing"
        return f"the database schema is older than this code ({detail}): run `dunning db upgrade` first"
    if pgcode == "42501":  # insufficient_privilege: the DATABASE_URL's user may not do this
        diag = getattr(orig, "diag", None)
        detail = getattr(diag, "message_primary", None) or "permission denied"
        return (f"the database refused the DATABASE_URL user: {detail} (grant it the privilege, or use the "
                "database's owner for `dunning db upgrade`)")
    if isinstance(exc, NoSuchModuleError | ArgumentError | ModuleNotFoundError):
        return f"DATABASE_URL cannot be used ({exc.__class__.__name__}: {exc}); expected postgresql://..."
    refused = _refused_option(exc)
    if refused is not None:
        return f"DATABASE_URL cannot be used: {refused}"
    return None


# libpq's words for a connection option it refuses when it connects (Settings checks the usual ones
# first): they quote the option and its value, never the password (which libpq does not check).
_REFUSED_OPTION = re.compile(r'invalid (?:connection option "[^"]*"|[a-z_]+ value: "[^"]*"|port number: "[^"]*"'
                             r'|integer value "[^"]*" for connection option "[^"]*")')


def _refused_option(exc: Exception) -> str | None:
    """libpq's reason when it refused a connection option of DATABASE_URL, else None."""
    import psycopg2
    from sqlalchemy.exc import DBAPIError

    driver = exc.orig if isinstance(exc, DBAPIError) else exc
    if not isinstance(driver, psycopg2.Error) or getattr(driver, "pgcode", None) is not None:
        return None  # the server answered: it was reached, so its options were read
    found = _REFUSED_OPTION.search(str(driver))
    return found.group(0) if found else None


if __name__ == "__main__":
    sys.exit(main())
