"""`dunning run`: the whole fleet on the private servers, stopped by a signal with nothing left
behind. Real processes: the launcher, PostgreSQL, Redis, gunicorn, a Celery worker, beat, Flower."""

from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest

from app import launcher
from app.embedded import free_port, read_pidfile, wait_for
from tasks import queues
from tests.integration.processes import answers

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 45.0
STOP_TIMEOUT = 20.0


def gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def dunning_command() -> list[str]:
    script = Path(sys.executable).parent / "dunning"
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.cli"]


def fleet_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {
        "DATABASE_URL", "CELERY_BROKER_URL", "CELERY_BROKER_KEY_PREFIX", "CELERY_RESULT_BACKEND",
        "STRIPE_WEBHOOK_SECRET", "SERVICE_TOKENS", "SUPPORT_TOKENS", "SECRET_KEY",
        "DUNNING_DATA_DIR", "DUNNING_PROCFILE", "FLOWER_ADDRESS", "PORT", "FLOWER_PORT",
    }}
    env.update(extra)
    return env


def everything_started(launcher_pid: int, data_dir: Path) -> list[psutil.Process]:
    """The launcher's descendants (its fleet, Redis) plus PostgreSQL, which pg_ctl daemonizes."""
    procs = psutil.Process(launcher_pid).children(recursive=True)
    postmaster = read_pidfile(data_dir / "postgres.pid").get("server_pid")
    assert postmaster, "no embedded PostgreSQL recorded"
    pg = psutil.Process(postmaster)
    procs += [pg, *pg.children(recursive=True)]
    redis_pid = read_pidfile(data_dir / "redis.pid").get("server_pid")
    assert redis_pid in {p.pid for p in procs}, "the embedded Redis is not the launcher's child"
    return procs


class PipeReader(threading.Thread):
    """Reads the launcher's output from a pipe into ``log``, as `make run | tee log` would, until
    told to leave; then the pipe has no reader, as when Ctrl-C has stopped tee."""

    def __init__(self, log: Path) -> None:
        super().__init__(daemon=True)
        self.read_end, self.write_end = os.pipe()
        self.log = log
        self.leaving = threading.Event()

    def run(self) -> None:
        with open(self.log, "wb") as out:
            while not self.leaving.is_set():
                if select.select([self.read_end], [], [], 0.1)[0]:
                    data = os.read(self.read_end, 65536)
                    if not data:
                        return
                    out.write(data)

    def leave(self) -> None:
        self.leaving.set()
        self.join()
        os.close(self.read_end)


def run_fleet_and_stop(data_dir: Path, log: Path, sig: signal.Signals, reader_leaves: bool = False,
                       **env: str) -> str:
    """Start `dunning run`, check every process is up, stop it with ``sig``; its output. With
    ``reader_leaves`` its output goes through a pipe whose reader is gone before the signal."""
    port, flower_port = free_port(), free_port()
    reader = PipeReader(log) if reader_leaves else None
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*dunning_command(), "run", "--data-dir", str(data_dir)],
            cwd=REPO, stdout=reader.write_end if reader else out, stderr=subprocess.STDOUT,
            start_new_session=True, env=fleet_env(PORT=str(port), FLOWER_PORT=str(flower_port), **env),
        )
    if reader:
        os.close(reader.write_end)
        reader.start()
    started: list[psutil.Process] = []
    try:
        def up() -> bool:
            assert proc.poll() is None, "the launcher exited:\n" + log.read_text()
            return (answers(f"http://127.0.0.1:{port}/healthz")
                    and answers(f"http://127.0.0.1:{flower_port}/healthcheck"))

        wait_for(up, START_TIMEOUT, "the web app and Flower")
        # Beat keeps its schedule in the data folder, not in the current directory.
        wait_for(lambda: any(data_dir.glob("celerybeat-schedule*")), 10, "beat's schedule file")
        # Flower's API is open for local use (FLOWER_UNAUTHENTICATED_API).
        assert answers(f"http://127.0.0.1:{flower_port}/api/workers?refresh=false")
        started = everything_started(proc.pid, data_dir)
        # honcho's output helpers are on record, for a next run to stop if this one is killed outright
        helpers = [pid for pid, _ in read_pidfile(data_dir / "fleet.pid")["helpers"]]
        assert len(helpers) == 4 and set(helpers) <= {p.pid for p in psutil.Process(proc.pid).children()}
        names = " ".join(" ".join(p.cmdline()) for p in started if not gone(p))
        for expected in ("gunicorn", "celery -A tasks worker", "celery -A tasks beat",
                         "celery -A tasks flower", "redis-server", "postgres"):
            assert expected in names

        if reader:
            reader.leave()
        proc.send_signal(sig)
        proc.wait(STOP_TIMEOUT)
        output = log.read_text()
        assert proc.returncode == 0, output
        wait_for(lambda: all(gone(p) for p in started), 5, "every process of the fleet to exit")
        assert not (data_dir / "fleet.pid").exists()
        assert not (data_dir / "postgres.pid").exists()
        assert not (data_dir / "redis.pid").exists()
        return output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in started:
            if not gone(p):
                p.kill()


def test_make_run_starts_the_fleet_and_a_signal_stops_everything(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = run_fleet_and_stop(data_dir, tmp_path / "first.log", signal.SIGINT)
    assert "SIGINT received" in first
    stored = json.loads((data_dir / "local-secrets.json").read_text())
    assert f"STRIPE_WEBHOOK_SECRET={stored['STRIPE_WEBHOOK_SECRET']}" in first
    assert f"SERVICE_TOKENS={stored['SERVICE_TOKENS']}" in first
    assert stored["SECRET_KEY"] not in first

    # A second run reuses the folder: same database cluster, same local credentials; a secret the
    # user configured is used and never printed.
    user_secret = "whsec_configured_by_the_user_0123456789"
    second = run_fleet_and_stop(data_dir, tmp_path / "second.log", signal.SIGTERM,
                                STRIPE_WEBHOOK_SECRET=user_secret)
    assert "SIGTERM received" in second
    assert user_secret not in second
    assert "STRIPE_WEBHOOK_SECRET=" not in second
    assert f"SERVICE_TOKENS={stored['SERVICE_TOKENS']}" in second
    assert json.loads((data_dir / "local-secrets.json").read_text()) == stored
    assert "stopping a PostgreSQL left running" not in second


def test_ctrl_c_stops_everything_even_when_nothing_reads_the_output_any_more(tmp_path: Path) -> None:
    """`make run | tee run.log`, and Ctrl-C: tee is gone before the launcher has said what it
    stopped. Writing to the pipe then fails; the fleet and both private servers must still stop."""
    output = run_fleet_and_stop(tmp_path / "data", tmp_path / "run.log", signal.SIGINT, reader_leaves=True)
    assert "starting web, worker, beat, flower" in output  # the reader did read until it left


def test_a_second_ctrl_c_that_lands_in_the_middle_of_a_print_is_shrugged_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """While stopping, Ctrl-C again makes the launcher say it is still stopping. If that signal
    arrives while the main thread is inside a print, Python refuses the nested write to the same
    stream (RuntimeError); that must cost the line, not the rest of the stop."""
    written: list[bytes] = []

    class Terminal(io.RawIOBase):
        interrupted = False

        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            if not self.interrupted:  # the signal arrives during the main thread's write
                self.interrupted = True
                launcher._still_stopping(signal.SIGINT, None)
            written.append(bytes(data))
            return len(data)

    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BufferedWriter(Terminal()), write_through=True))
    launcher.say("PostgreSQL: stopped")
    sys.stdout.flush()
    assert b"".join(written) == b"dunning run | PostgreSQL: stopped\n"


def test_the_procfile_and_the_builtin_copy_agree() -> None:
    from honcho.environ import parse_procfile

    in_repo = parse_procfile((REPO / "Procfile").read_text()).processes
    builtin = parse_procfile(launcher.DEFAULT_PROCFILE).processes
    assert dict(in_repo) == dict(builtin)
    assert launcher.procfile_processes({}) == dict(in_repo)


def test_a_named_procfile_is_the_one_run_or_a_clear_error(tmp_path: Path) -> None:
    own = tmp_path / "Procfile"
    own.write_text("web: echo hello\n")
    assert launcher.procfile_processes({"DUNNING_PROCFILE": str(own)}) == {"web": "echo hello"}
    # a mistyped path is not quietly replaced by the checkout's Procfile
    with pytest.raises(launcher.LaunchError, match="not a file"):
        launcher.procfile_processes({"DUNNING_PROCFILE": str(tmp_path / "Procfiel")})


def test_the_procfile_follows_the_contract() -> None:
    procs = launcher.procfile_processes({})
    assert list(procs) == ["web", "worker", "beat", "flower"]
    assert "gunicorn 'app:create_app()'" in procs["web"]
    assert "--bind 0.0.0.0:${PORT:-5000}" in procs["web"]
    assert "celery -A tasks worker -E " in procs["worker"]
    assert f"-Q {','.join(queues.ALL)} " in procs["worker"]
    assert "--prefetch-multiplier 1" in procs["worker"]
    assert '--schedule "${DUNNING_DATA_DIR:-.dunning}/celerybeat-schedule"' in procs["beat"]
    assert "--port=${FLOWER_PORT:-5555}" in procs["flower"]
    assert "--address=${FLOWER_ADDRESS:-127.0.0.1}" in procs["flower"]
    assert "FLOWER_UNAUTHENTICATED_API=" in procs["flower"]
    for name, command in procs.items():  # the program replaces the shell, so a container's SIGTERM reaches it
        assert re.search(r"(^|&& )exec (gunicorn|celery) ", command), name


def test_local_credentials_are_generated_once_and_never_replace_configured_ones(
    tmp_path: Path,
) -> None:
    first = launcher.local_credentials({}, tmp_path)
    assert set(first) == {"STRIPE_WEBHOOK_SECRET", "SERVICE_TOKENS", "SUPPORT_TOKENS", "SECRET_KEY"}
    assert first["SUPPORT_TOKENS"].startswith("support:")
    assert launcher.local_credentials({}, tmp_path) == first
    assert (tmp_path / launcher.SECRETS_FILE).stat().st_mode & 0o777 == 0o600
    configured = launcher.local_credentials({"SERVICE_TOKENS": "mine", "SECRET_KEY": "k"}, tmp_path)
    assert set(configured) == {"STRIPE_WEBHOOK_SECRET", "SUPPORT_TOKENS"}


def test_a_second_launcher_on_the_same_data_folder_is_refused(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    try:
        from app.embedded import create_time, write_pidfile

        write_pidfile(tmp_path / launcher.FLEET_FILE, {
            "owner_pid": holder.pid, "owner_started": create_time(holder.pid), "groups": [],
        })
        with pytest.raises(launcher.LaunchError, match="another `dunning run`"):
            launcher.claim_data_dir(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    launcher.claim_data_dir(tmp_path)  # its owner is gone: the folder is free again
    assert read_pidfile(tmp_path / launcher.FLEET_FILE)["owner_pid"] == os.getpid()


def test_a_launcher_killed_outright_leaves_no_output_helper_behind_the_next_run(tmp_path: Path) -> None:
    """Killed with SIGKILL, a launcher cannot stop honcho's helpers, which then block for ever
    writing to its full output queue (SIGTERM does not end them). The next run stops the ones on
    record, and only those: a pid reused by another process is left alone."""
    from app.embedded import create_time, write_pidfile

    stuck = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    other = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    dead_owner = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_owner.wait()
    try:
        write_pidfile(tmp_path / launcher.FLEET_FILE, {
            "owner_pid": dead_owner.pid, "owner_started": 0.0, "groups": [],
            "helpers": [[stuck.pid, create_time(stuck.pid)], [other.pid, create_time(other.pid) - 100]],
        })
        launcher.claim_data_dir(tmp_path)
        assert stuck.wait(5) == -signal.SIGKILL
        assert other.poll() is None  # not the process recorded under that pid
    finally:
        for p in (stuck, other):
            if p.poll() is None:
                p.kill()
                p.wait()
