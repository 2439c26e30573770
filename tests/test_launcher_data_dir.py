"""`dunning run` and its data folder: one fleet per folder, and a folder it cannot use said plainly.
Real launcher processes on a temporary data folder, a stand-in Procfile (no ports)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import psutil
import pytest

from app.embedded import create_time, free_port, wait_for, write_pidfile
from tests.test_launcher import REPO, STOP_TIMEOUT, dunning_command, fleet_env, gone

START_TIMEOUT = 60.0

# Stands for a Redis a launcher killed outright left running: named redis, it notes the SIGTERM that
# the next launcher sends it and does not exit, so that launcher waits for it, mid-claim.
STUBBORN_REDIS = textwrap.dedent("""
    import signal, sys, threading
    from pathlib import Path
    Path("/proc/self/comm").write_text("redis-leftover")
    signal.signal(signal.SIGTERM, lambda *_: Path(sys.argv[1]).write_text("SIGTERM"))
    threading.Event().wait()
""")


def launch(data_dir: Path, log: Path, procfile: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*dunning_command(), "run", "--data-dir", str(data_dir)], cwd=REPO, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True, env=fleet_env(DUNNING_PROCFILE=str(procfile)),
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C: the launcher stops what it started (its private servers included)."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGINT)
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def kill_programs(marker: str) -> None:
    """The stand-in programs (``sleep <marker>``) a launcher killed by the test left."""
    for proc in psutil.process_iter(["cmdline"]):
        if proc.info["cmdline"] == ["sleep", marker] and not gone(proc):
            proc.kill()


def test_two_launchers_at_once_never_run_two_fleets_on_one_data_folder(tmp_path: Path) -> None:
    """Two `make run` at once on one folder, after a run killed outright: each read the dead run's
    fleet file, each took it for free while the other was stopping the leftovers, and two fleets
    ran, sharing the private PostgreSQL (either one stopping it under the other) with two Redis
    servers writing one dump.rdb. The second launcher must be refused while the first claims."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    marker = f"3600.{uuid.uuid4().int % 10**9}"
    procfile = tmp_path / "Procfile"
    procfile.write_text(f"program: exec sleep {marker}\n")
    noted = tmp_path / "sigterm"
    leftover = subprocess.Popen([sys.executable, "-c", STUBBORN_REDIS, str(noted)])
    dead_owner = subprocess.Popen(["true"])
    dead_owner.wait()
    first = second = None
    try:
        wait_for(lambda: psutil.Process(leftover.pid).name() == "redis-leftover", START_TIMEOUT,
                 "the leftover's name")
        write_pidfile(data_dir / "redis.pid", {"owner_pid": dead_owner.pid, "owner_started": 0.0,
                                               "server_pid": leftover.pid,
                                               "server_started": create_time(leftover.pid)})
        first = launch(data_dir, tmp_path / "first.log", procfile)
        # The first launcher is claiming the folder: it waits for the leftover it told to stop.
        wait_for(lambda: noted.exists() or first.poll() is not None, START_TIMEOUT, "the leftover's SIGTERM")
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        first.send_signal(signal.SIGSTOP)  # held there, mid-claim
        leftover.kill()
        leftover.wait()

        second = launch(data_dir, tmp_path / "second.log", procfile)
        second_log = tmp_path / "second.log"
        wait_for(lambda: second.poll() is not None or "program started" in second_log.read_text(),
                 START_TIMEOUT, "the second launcher to start its fleet or give up")
        output = second_log.read_text()
        assert second.poll() == 1, output
        assert "another `dunning run`" in output and str(data_dir) in output
        assert "Traceback" not in output

        first.send_signal(signal.SIGCONT)  # the first one goes on, and starts its fleet
        first_log = tmp_path / "first.log"
        wait_for(lambda: first.poll() is not None or "program started" in first_log.read_text(),
                 START_TIMEOUT, "the first launcher's fleet")
        assert first.poll() is None, first_log.read_text()
    finally:
        for proc in (second, first):
            if proc is not None:
                stop(proc)
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()
        kill_programs(marker)


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_data_folder_that_cannot_be_made_is_a_clear_error(tmp_path: Path, where: str) -> None:
    """A data folder the launcher cannot make or write (a file in its place, a read-only disk, a full
    one) was an OSError traceback from `make run`; it must say what is wrong and where."""
    taken = tmp_path / "taken"
    taken.write_text("not a folder\n")
    data_dir = taken if where == "a file" else taken / "data"
    run = subprocess.run([*dunning_command(), "run", "--data-dir", str(data_dir)], cwd=REPO,
                         capture_output=True, text=True, timeout=60,
                         env=fleet_env(DUNNING_PROCFILE=str(REPO / "Procfile")))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert f"the data folder {data_dir} must be a folder" in run.stderr, run.stderr
    assert str(taken) in run.stderr


@pytest.mark.parametrize(("name", "value", "said"), [
    ("CELERY_VISIBILITY_TIMEOUT", "10", "CELERY_VISIBILITY_TIMEOUT must be at least 185 seconds"),
    ("SUPPORT_TOKENS", "no-actor-named", "SUPPORT_TOKENS entries must look like actor:token"),
    ("DUNNING_POLICY", "/nonexistent/policy.toml", "policy file /nonexistent/policy.toml (DUNNING_POLICY) does not"),
    ("STRIPE_WEBHOOK_SECRET", "whsec_one two", "STRIPE_WEBHOOK_SECRET holds whitespace inside it"),
    ("WEB_CONCURRENCY", "abc", "WEB_CONCURRENCY (gunicorn workers) must be a whole number of at least 1"),
])
def test_a_setting_every_process_refuses_stops_make_run_before_anything_starts(
        tmp_path: Path, name: str, value: str, said: str) -> None:
    """`make run` checked DATABASE_URL and CELERY_BROKER_URL only: with any other setting the fleet's
    processes refuse (a visibility timeout too short, a malformed token list, a missing policy file),
    it started the private servers and the fleet, and web, worker, beat and Flower each died with a
    traceback. The launcher must refuse it first, as each process would, and start nothing."""
    data_dir = tmp_path / "data"
    run = subprocess.run(
        [*dunning_command(), "run", "--data-dir", str(data_dir)], cwd=REPO, capture_output=True, text=True,
        timeout=120, env=fleet_env(PORT=str(free_port()), FLOWER_PORT=str(free_port()),
                                   WORKER_METRICS_PORT=str(free_port()), **{name: value}),
    )
    output = run.stdout + run.stderr
    assert run.returncode == 2, output
    assert said in run.stderr, output
    assert "Traceback" not in output, output
    assert not (data_dir / "pg").exists(), "a private server was started"
