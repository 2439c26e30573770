"""`make run` as users run it: under GNU make, on servers the environment names, and Flower behind a
login. Real make, launcher, private servers and a stand-in Procfile (no ports) where the fleet's
programs do not matter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from app import launcher
from app.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, wait_for
from tests.test_launcher import (
    REPO,
    STOP_TIMEOUT,
    everything_started,
    finish,
    fleet_env,
    gone,
    programs,
)

START_TIMEOUT = 60.0


def _stop_signals_default() -> None:
    # A test run from a background job may have SIGINT ignored; make would keep ignoring it.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def make_run(data_dir: Path, log: Path, procfile: Path) -> subprocess.Popen[bytes]:
    """The repository's `make run`, on this test's Python: its virtualenv taken as installed."""
    venv = Path(sys.executable).parent.parent
    env = {k: v for k, v in fleet_env(DUNNING_PROCFILE=str(procfile), DUNNING_DATA_DIR=str(data_dir)).items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # a `make test` around this one
    with open(log, "wb") as out:
        return subprocess.Popen(
            ["make", "-s", "-o", f"{venv}/.installed-stamp", "run", f"VENV={venv}",
             f"BIN={Path(sys.executable).parent}"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env,
            preexec_fn=_stop_signals_default,
        )


@dataclass
class MakeRun:
    make: subprocess.Popen[bytes]
    run: psutil.Process  # the launcher (`dunning run`), make's child
    started: list[psutil.Process]  # it and everything it started
    marker: str  # what the stand-in program's command line holds
    log: Path
    data_dir: Path


@contextmanager
def make_run_started(tmp_path: Path, program: str) -> Iterator[MakeRun]:
    """`make run` of a stand-in Procfile whose one process runs ``program`` (``{marker}`` in it is
    replaced by a sleep's unique duration), once that process has started; whatever it started is gone
    at the end, the private servers included."""
    marker = f"3600.{uuid.uuid4().int % 10**9}"
    procfile = tmp_path / "Procfile"
    procfile.write_text(f"one: {program.format(marker=marker)}\n")
    data_dir, log = tmp_path / "data", tmp_path / "run.log"
    make = make_run(data_dir, log, procfile)
    started: list[psutil.Process] = []
    try:
        wait_for(lambda: "one started" in log.read_text() or make.poll() is not None, START_TIMEOUT,
                 "the fleet to start")
        assert make.poll() is None, log.read_text()
        [run] = psutil.Process(make.pid).children()
        started.extend([run, *everything_started(run.pid, data_dir)])
        yield MakeRun(make, run, started, marker, log, data_dir)
    finally:
        finish(make, marker)
        for p in started:
            if not gone(p):
                p.kill()
        EmbeddedPostgres(data_dir).stop_leftover()


@pytest.mark.parametrize("sig, group", [
    (signal.SIGINT, False), (signal.SIGHUP, False), (signal.SIGKILL, False), (signal.SIGTERM, False),
    (signal.SIGINT, True),
], ids=["SIGINT", "SIGHUP", "SIGKILL", "SIGTERM", "ctrl-c"])
def test_a_signal_to_makes_pid_alone_stops_everything_make_run_started(
    tmp_path: Path, sig: signal.Signals, group: bool,
) -> None:
    """`kill -INT <make's pid>` (or HUP): GNU make passes neither on to the launcher (only SIGTERM); it
    waits for the launcher, which ran the fleet on for ever. Make killed outright (SIGKILL) left the
    fleet and the private servers running under pid 1. Every process make run started must go. A
    terminal's Ctrl-C (``group``) reaches make and the launcher both: one stop, not a second signal
    that kills the fleet."""
    with make_run_started(tmp_path, "exec sleep {marker}") as fleet:
        make = fleet.make
        assert "run" in fleet.run.cmdline(), fleet.run.cmdline()
        assert programs(fleet.marker)
        if group:
            os.killpg(make.pid, sig)
        else:
            os.kill(make.pid, sig)
        wait_for(lambda: all(gone(p) for p in fleet.started), STOP_TIMEOUT,
                 "every process make run started to exit")
        make.wait(STOP_TIMEOUT)
        output = fleet.log.read_text()
        assert make.returncode == -sig, output  # make ends by the signal it got, once the launcher has stopped
        assert "received again" not in output and "SIGKILL" not in output
        if group:
            assert "SIGINT received" in output
        elif sig != signal.SIGTERM:  # SIGTERM make passes on
            said = "is gone" if sig == signal.SIGKILL else f"got {sig.name}, which it does not pass on"
            assert f"make (pid {make.pid}) {said}" in output
        assert not programs(fleet.marker)
        assert not (fleet.data_dir / "postgres.pid").exists() and not (fleet.data_dir / "redis.pid").exists()


def test_a_ctrl_c_after_a_signal_to_makes_pid_alone_kills_what_does_not_stop(tmp_path: Path) -> None:
    """make got SIGINT alone (`kill -INT <make's pid>`): the launcher stops the fleet for it, and the
    flag that absorbs the terminal's duplicate Ctrl-C stayed set with no duplicate to absorb, so the
    user's Ctrl-C, meant to kill a program that does not stop, was ignored (it died only at KILL_WAIT)."""
    # A program that ignores the stop.
    with make_run_started(tmp_path, "trap '' TERM; exec sleep {marker}") as fleet:
        make, log = fleet.make, fleet.log
        os.kill(make.pid, signal.SIGINT)
        relayed = f"make (pid {make.pid}) got SIGINT, which it does not pass on"
        wait_for(lambda: relayed in log.read_text() or gone(fleet.run), STOP_TIMEOUT,
                 "the launcher to stop for make")
        assert programs(fleet.marker), log.read_text()  # still running: it ignores SIGTERM
        os.killpg(make.pid, signal.SIGINT)  # the terminal's Ctrl-C: make (SIGINT reset) and the launcher
        wait_for(lambda: all(gone(p) for p in fleet.started), STOP_TIMEOUT,
                 "every process make run started to exit")
        output = log.read_text()
        assert "SIGINT received again: killing what is still running" in output, output
        assert not programs(fleet.marker)


# --- servers the environment names ---------------------------------------------------------------

# `dunning run` waiting 1 s (not launcher.SERVER_WAIT) for a server the environment names.
IMPATIENT_RUN = textwrap.dedent("""
    import sys
    from app import cli, launcher
    launcher.SERVER_WAIT = 1.0
    sys.exit(cli.main(["run", "--data-dir", sys.argv[1]]))
""")


@pytest.mark.parametrize("name", ["DATABASE_URL", "CELERY_BROKER_URL"])
def test_a_server_the_environment_names_that_does_not_answer_stops_the_run_before_anything_starts(
    tmp_path: Path, name: str,
) -> None:
    """A broker that is down: the fleet started anyway, each process logging connection errors for
    ever (a database that is down: a traceback from the migrations). The run must wait a bounded
    time, saying for what, then exit non-zero naming the server, its password hidden; nothing started."""
    marker = f"3600.{uuid.uuid4().int % 10**9}"
    procfile = tmp_path / "Procfile"
    procfile.write_text(f"one: exec sleep {marker}\n")
    password = "s3cret-" + uuid.uuid4().hex
    port = free_port()  # nothing listens on it
    url, shown, what = {
        "DATABASE_URL": (f"postgresql://dunning:{password}@127.0.0.1:{port}/dunning",
                         f"postgresql://dunning:***@127.0.0.1:{port}/dunning", "PostgreSQL"),
        "CELERY_BROKER_URL": (f"redis://:{password}@127.0.0.1:{port}/0", f"redis://:***@127.0.0.1:{port}/0",
                              "the broker"),
    }[name]
    data_dir, log = tmp_path / "data", tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", IMPATIENT_RUN, str(data_dir)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env=fleet_env(DUNNING_PROCFILE=str(procfile), **{name: url}),
        )
    try:
        wait_for(lambda: proc.poll() is not None, START_TIMEOUT, "the run to give up")
        output = log.read_text()
        assert proc.returncode == (3 if name == "DATABASE_URL" else 1), output  # 3: as every command's
        assert f"waiting up to 1 s for {what} at {shown} ({name}): " in output
        assert "Connection refused" in output  # why, in the server's client's words
        assert f"error: {what} at {shown} ({name}) did not answer within 1 s" in output
        assert password not in output
        assert not programs(marker)
        assert not (data_dir / "pg").exists() and not (data_dir / "redis").exists()  # no private server either
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(STOP_TIMEOUT)
        finish(proc, marker)
        EmbeddedPostgres(data_dir).stop_leftover()


def test_a_server_that_refuses_the_credentials_is_not_waited_for(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong password is not cured by waiting: said at once, the password hidden."""
    with EmbeddedRedis(tmp_path) as redis:
        port = redis.port
        url = f"redis://:wrong-{uuid.uuid4().hex}@127.0.0.1:{port}/0"
        with pytest.raises(launcher.LaunchError) as err:
            launcher.wait_for_server("CELERY_BROKER_URL", url, 600.0)
        launcher.wait_for_server("CELERY_BROKER_URL", redis.url, 600.0)  # the right one answers
    message = str(err.value)
    assert message.startswith(f"the broker at redis://:***@127.0.0.1:{port}/0 (CELERY_BROKER_URL) refused "
                              "the connection: "), message
    assert url.split("@")[0].split(":")[-1] not in message + capsys.readouterr().out
    assert "waiting" not in capsys.readouterr().out


def test_a_broker_whose_host_name_speaks_of_auth_is_waited_for_as_any_other(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The client's words name the host ("Error -2 connecting to auth.localhost:1. Name or service not
    known."): a broker host called redis-auth or oauth-cache that is not up yet (a compose service still
    starting) was taken for a server refusing the credentials, and the run stopped at once."""
    url = "redis://auth.localhost:1/0"  # a name that does not resolve, and nothing listens on port 1
    with pytest.raises(launcher.ServerUnreachable) as err:
        launcher.wait_for_server("CELERY_BROKER_URL", url, 1.0)
    assert str(err.value).startswith(f"the broker at {url} (CELERY_BROKER_URL) did not answer within 1 s"), err.value
    assert f"waiting up to 1 s for the broker at {url}" in capsys.readouterr().out


def test_a_password_in_a_servers_words_is_hidden() -> None:
    url = "amqp://ops:pa%2Fss@rabbit:5672//;amqp://ops:other@rabbit2:5672//"
    assert launcher._scrubbed("login pa/ss and pa%2Fss and other refused", url) == "login *** and *** and *** refused"


# --- Flower ----------------------------------------------------------------------------------------


def test_make_run_gives_flower_a_login_kept_in_the_data_folder(tmp_path: Path) -> None:
    """Flower's API (it applies tasks, shuts workers down) was open without login under make run, to
    every local user and to any web page in the developer's browser (a cross-site POST). A login is
    generated once into local-secrets.json (0600), kept for later runs; one the user gives is used."""
    made, new = launcher.load_local_credentials({}, tmp_path, flower_login=True)
    user, _, password = made["FLOWER_BASIC_AUTH"].partition(":")
    assert user == "admin" and len(password) >= 32 and "FLOWER_BASIC_AUTH" in new
    stored = tmp_path / launcher.SECRETS_FILE
    assert stored.stat().st_mode & 0o777 == 0o600
    assert json.loads(stored.read_text())["FLOWER_BASIC_AUTH"] == made["FLOWER_BASIC_AUTH"]
    again, new = launcher.load_local_credentials({}, tmp_path, flower_login=True)
    assert again["FLOWER_BASIC_AUTH"] == made["FLOWER_BASIC_AUTH"] and not new
    # the user's own login (or OAuth) is Flower's; none is made or passed on
    for own in ({"FLOWER_BASIC_AUTH": "ops:theirs"}, {"FLOWER_AUTH": ".*@example\\.com"}):
        assert "FLOWER_BASIC_AUTH" not in launcher.load_local_credentials(own, tmp_path, flower_login=True)[0]
    # without Flower in the fleet none is made
    (tmp_path / "other").mkdir()
    assert "FLOWER_BASIC_AUTH" not in launcher.load_local_credentials({}, tmp_path / "other")[0]


def test_flowers_login_under_make_run() -> None:
    assert launcher.flower_login_wanted({}, {"flower": "x"})
    assert not launcher.flower_login_wanted({}, {"web": "x"})
    assert not launcher.flower_login_wanted({"FLOWER_AUTH": ".*@example\\.com"}, {"flower": "x"})
    assert launcher.flower_login_wanted({"FLOWER_UNAUTHENTICATED_API": "false"}, {"flower": "x"})
    # asked for by name: an open API on loopback, as the user wants it
    assert not launcher.flower_login_wanted({"FLOWER_UNAUTHENTICATED_API": "true"}, {"flower": "x"})
