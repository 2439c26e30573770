"""`dunning run`: the whole fleet on the private servers, stopped by a signal with nothing left
behind. Real processes: the launcher, PostgreSQL, Redis, gunicorn, a Celery worker, beat, Flower."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from app import fleet, launcher
from app.config import ConfigError
from app.embedded import create_time, free_port, read_pidfile, wait_for, write_pidfile
from tasks import queues
from tests.integration.processes import answers

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 45.0
STOP_TIMEOUT = 20.0


def started_before(pid: int, seconds: float) -> float:
    """A start time ``seconds`` before the process's own: another process that had that pid."""
    started = create_time(pid)
    assert started is not None, pid
    return started - seconds


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
        "FLOWER_BASIC_AUTH", "FLOWER_AUTH", "FLOWER_UNAUTHENTICATED_API", "WORKER_METRICS_PORT",
    }}
    # Not the default 9808: make run refuses a worker metrics port in use (another fleet's, here or a test's).
    env["WORKER_METRICS_PORT"] = str(free_port())
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


def status(url: str, login: str | None = None) -> int:
    """The HTTP status ``url`` answers, with ``login`` (user:password) as basic auth."""
    request = urllib.request.Request(url)
    if login is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def run_fleet_and_stop(data_dir: Path, log: Path, sig: signal.Signals, reader_leaves: bool = False,
                       to_group: bool = False, **env: str) -> str:
    """Start `dunning run`, check every process is up, stop it with ``sig``; its output. With
    ``reader_leaves`` its output goes through a pipe whose reader is gone before the signal. With
    ``to_group`` the signal goes to the launcher's whole process group, honcho's helpers included,
    as a terminal sends Ctrl-C's SIGINT, or SIGHUP when it is closed."""
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
        wait_for(lambda: any(data_dir.glob("celerybeat-schedule*")), START_TIMEOUT, "beat's schedule file")
        # Flower's API (it applies tasks, shuts workers down) asks for the login kept in the data folder.
        api = f"http://127.0.0.1:{flower_port}/api/workers?refresh=false"
        assert status(api) == 401
        login = env.get("FLOWER_BASIC_AUTH") or json.loads((data_dir / "local-secrets.json").read_text())[
            "FLOWER_BASIC_AUTH"]
        assert status(api, login.replace(":", ":not-", 1)) == 401
        assert status(api, login) == 200
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
        if to_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        proc.wait(STOP_TIMEOUT)
        output = log.read_text()
        assert proc.returncode == 0, output
        assert login.partition(":")[2] not in output
        wait_for(lambda: all(gone(p) for p in started), STOP_TIMEOUT, "every process of the fleet to exit")
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
    first = run_fleet_and_stop(data_dir, tmp_path / "first.log", signal.SIGINT, to_group=True)
    assert "SIGINT received" in first
    stored = json.loads((data_dir / "local-secrets.json").read_text())
    assert f"STRIPE_WEBHOOK_SECRET={stored['STRIPE_WEBHOOK_SECRET']}" in first
    assert f"SERVICE_TOKENS={stored['SERVICE_TOKENS']}" in first
    assert stored["SECRET_KEY"] not in first
    assert f"(login admin, its password in {data_dir / 'local-secrets.json'}: FLOWER_BASIC_AUTH)" in first

    # A second run reuses the folder: same database cluster, same local credentials, which were
    # printed once, when generated: now only where they are kept is said. A secret the user
    # configured is used and never printed.
    user_secret = "whsec_configured_by_the_user_0123456789"
    second = run_fleet_and_stop(data_dir, tmp_path / "second.log", signal.SIGTERM,
                                STRIPE_WEBHOOK_SECRET=user_secret, FLOWER_BASIC_AUTH="ops:flower-login-of-the-user")
    assert "SIGTERM received" in second
    assert user_secret not in second
    assert "STRIPE_WEBHOOK_SECRET" not in second
    for name in ("SERVICE_TOKENS", "SUPPORT_TOKENS"):
        assert stored[name] not in second
    kept = data_dir / "local-secrets.json"
    assert f"SERVICE_TOKENS, SUPPORT_TOKENS: generated by an earlier run, kept in {kept}" in second
    assert json.loads((data_dir / "local-secrets.json").read_text()) == stored
    assert "stopping a PostgreSQL left running" not in second


def test_a_closed_terminal_stops_everything(tmp_path: Path) -> None:
    """Closing the terminal (or a dropped SSH session) sends SIGHUP to the launcher's process group:
    the launcher and honcho's helpers. The fleet and both private servers must stop, as on Ctrl-C,
    not keep running under pid 1."""
    output = run_fleet_and_stop(tmp_path / "data", tmp_path / "run.log", signal.SIGHUP, to_group=True)
    assert "SIGHUP received" in output


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
                fleet.still_stopping(signal.SIGINT, None)
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


def test_a_named_procfile_that_is_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    """Only "not a file" was caught: a Procfile in another encoding was a UnicodeDecodeError traceback
    from `dunning process` and `dunning run`."""
    latin1 = tmp_path / "Procfile"
    latin1.write_bytes(b"web: echo caf\xe9\n")
    with pytest.raises(launcher.LaunchError) as err:
        launcher.procfile_processes({"DUNNING_PROCFILE": str(latin1)})
    assert str(err.value) == f"DUNNING_PROCFILE names {latin1}, which cannot be read: it is not UTF-8 text (byte 13)"


def test_a_broker_url_set_for_the_fleet_is_checked_before_anything_starts(tmp_path: Path) -> None:
    """As DATABASE_URL is: the processes would each fail at start (or the web at its first webhook)."""
    with pytest.raises(ConfigError, match="CELERY_BROKER_URL's port must be a number from 1 to 65535"):
        launcher.Launcher(tmp_path, {})._broker({"CELERY_BROKER_URL": "redis://127.0.0.1:abc/0"})


def test_a_configured_broker_is_named_for_what_it_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """RabbitMQ works as the broker: make run said 'Redis: the broker CELERY_BROKER_URL names' for it."""
    url = "amqp://guest:guest@127.0.0.1:5672//"
    assert launcher.Launcher(tmp_path, {})._broker({"CELERY_BROKER_URL": url}) == url
    said = capsys.readouterr().out
    assert said == "dunning run | broker: the server CELERY_BROKER_URL names\n"
    assert not (tmp_path / "redis").exists()


def test_the_private_brokers_password_is_never_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """make run's output lands in terminals' scrollback, `make run | tee run.log`, CI logs: it names
    the private Redis and where its password is kept, not the password."""
    run = launcher.Launcher(tmp_path, {})
    try:
        url = run._broker({})
        said = capsys.readouterr().out
    finally:
        run._stop_servers()
    password = url.partition("://:")[2].partition("@")[0]
    assert len(password) >= 32
    assert password not in said
    assert "Redis: private server" in said and str(tmp_path / "redis" / "redis.conf") in said


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
    assert "WORKER_METRICS_PORT:-9808" in procs["worker"]  # as README says
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


def test_local_credentials_kept_survive_a_write_that_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A credential made later (one the user stopped configuring) is written beside the kept ones. The
    file was emptied first and written after: a full disk (or a stop signal) between the two lost every
    kept credential, and the next run made and printed new ones (scripts holding the old token refused)."""
    kept = launcher.local_credentials({"SERVICE_TOKENS": "mine"}, tmp_path)
    before = (tmp_path / launcher.SECRETS_FILE).read_text()

    def disk_full(obj: Any, fh: Any, **kwargs: Any) -> None:
        fh.write("{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(launcher.json, "dump", disk_full)
    with pytest.raises(OSError):
        launcher.local_credentials({}, tmp_path)
    monkeypatch.undo()
    assert (tmp_path / launcher.SECRETS_FILE).read_text() == before
    assert {k: v for k, v in launcher.local_credentials({}, tmp_path).items() if k in kept} == kept


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
            "helpers": [[stuck.pid, create_time(stuck.pid)], [other.pid, started_before(other.pid, 100)]],
        })
        launcher.claim_data_dir(tmp_path)
        assert stuck.wait(STOP_TIMEOUT) == -signal.SIGKILL
        assert other.poll() is None  # not the process recorded under that pid
    finally:
        for p in (stuck, other):
            if p.poll() is None:
                p.kill()
                p.wait()


# --- stopping: the signal's timing -------------------------------------------------------------

MANAGER_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    from app import fleet

    fleet.KILL_WAIT = float(sys.argv[2])

    class Manager(fleet.FleetManager):
        def _start(self):
            super()._start()
            # SIGTERM lands right after the helpers are forked, before any of them has reported
            # its program's pid.
            os.kill(os.getpid(), signal.SIGTERM)

    manager = Manager(None, Path(sys.argv[1]))
    for name in ("one", "two", "three"):
        manager.add_process(name, sys.argv[3])
    manager.loop()
    print("RESULT " + json.dumps({"stop_signal": manager.stop_signal, "pids": manager.child_pids()}))
""")


def run_manager(tmp_path: Path, command: str, kill_wait: float) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "manager.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", MANAGER_SCRIPT, str(tmp_path / "fleet.pid"), str(kill_wait), command],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return proc, log


def programs(marker: str) -> list[psutil.Process]:
    """The stand-in programs still running (``sleep <marker>``)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if p.info["cmdline"] == ["sleep", marker] and not gone(p):
            found.append(p)
    return found


def finish(proc: subprocess.Popen[bytes], marker: str) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for p in programs(marker):
        p.kill()


def test_a_stop_signal_before_the_programs_report_their_pids_stops_them(tmp_path: Path) -> None:
    """SIGTERM right after honcho forked its helpers, before any program has reported its pid:
    honcho's stop read every program's pid (KeyError), had marked itself stopping, and ignored
    every later signal: the launcher could only be killed. Each program must be stopped as soon
    as it reports its pid."""
    marker = f"3600.{uuid.uuid4().int % 10**9}"
    proc, log = run_manager(tmp_path, f"exec sleep {marker}", kill_wait=120)
    try:
        proc.wait(STOP_TIMEOUT)
        output = log.read_text()
        assert proc.returncode == 0, output
        result = json.loads(output.split("RESULT ", 1)[1])
        assert result["stop_signal"] == "SIGTERM"
        assert len(result["pids"]) == 3, output
        for name in ("one", "two", "three"):
            assert f"{name} is starting: it is stopped once it has started" in output
            assert f"sending SIGTERM to {name}" in output
        assert not programs(marker)
    finally:
        finish(proc, marker)


def test_a_second_signal_kills_what_ignores_the_first(tmp_path: Path) -> None:
    """Programs that ignore SIGTERM: a second Ctrl-C while the fleet stops kills them at once
    (here SIGKILL would otherwise come only after two minutes)."""
    marker = f"3600.{uuid.uuid4().int % 10**9}"
    proc, log = run_manager(tmp_path, f"trap '' TERM; exec sleep {marker}", kill_wait=120)
    try:
        wait_for(lambda: log.read_text().count("sending SIGTERM") == 3 or proc.poll() is not None,
                 STOP_TIMEOUT, "SIGTERM sent to each program")
        assert proc.poll() is None, log.read_text()
        assert len(programs(marker)) == 3  # they ignored it
        proc.send_signal(signal.SIGINT)
        proc.wait(STOP_TIMEOUT)
        output = log.read_text()
        assert proc.returncode == 0, output
        assert "SIGINT received again: killing what is still running" in output
        assert output.count("sending SIGKILL") == 3
        assert json.loads(output.split("RESULT ", 1)[1])["stop_signal"] == "SIGTERM"
        assert not programs(marker)
    finally:
        finish(proc, marker)


def test_a_program_killed_by_a_signal_ends_the_run_with_the_shells_status_for_it(tmp_path: Path) -> None:
    """A program of the fleet killed outright (the OOM killer's SIGKILL) stops the rest, and the run
    exits 128 + the signal's number, as a shell reports it: it exited 247 (honcho's -9 given to
    sys.exit), a status no operator or supervisor reads as SIGKILL."""
    marker = f"3600.{uuid.uuid4().int % 10**9}"
    procfile = tmp_path / "Procfile"
    procfile.write_text(f"one: exec sleep {marker}\ntwo: kill -KILL $$\n")
    try:
        run = subprocess.run(
            [*dunning_command(), "run", "--data-dir", str(tmp_path / "data")], cwd=REPO,
            capture_output=True, text=True, timeout=120,
            env=fleet_env(DUNNING_PROCFILE=str(procfile)),
        )
        assert "two stopped (rc=-9)" in run.stdout, run.stdout + run.stderr
        assert run.returncode == 128 + signal.SIGKILL, run.stdout + run.stderr
        assert not programs(marker)
        assert not (tmp_path / "data" / "postgres.pid").exists()
        assert not (tmp_path / "data" / "redis.pid").exists()
    finally:
        for p in programs(marker):
            p.kill()


@pytest.mark.parametrize("server", ["redis", "postgres"])
def test_a_private_server_that_dies_stops_the_fleet(tmp_path: Path, server: str) -> None:
    """The private Redis or PostgreSQL killed under a running fleet (the OOM killer, a stray kill):
    the launcher watched only the Procfile's programs, so the fleet ran on for ever against a server
    that was gone, logging connection errors. It must stop the rest and exit non-zero, as when a
    program of the fleet exits on its own."""
    marker = f"3600.{uuid.uuid4().int % 10**9}"
    procfile = tmp_path / "Procfile"
    procfile.write_text(f"one: exec sleep {marker}\n")
    data_dir, log = tmp_path / "data", tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*dunning_command(), "run", "--data-dir", str(data_dir)], cwd=REPO, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True, env=fleet_env(DUNNING_PROCFILE=str(procfile)),
        )
    try:
        wait_for(lambda: "one started" in log.read_text() or proc.poll() is not None, START_TIMEOUT,
                 "the fleet to start")
        assert proc.poll() is None, log.read_text()
        server_pid = read_pidfile(data_dir / f"{server}.pid")["server_pid"]
        os.kill(server_pid, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT)
        output = log.read_text()
        name = {"redis": "Redis", "postgres": "PostgreSQL"}[server]
        assert f"the private {name} exited" in output
        assert proc.returncode == (128 + signal.SIGKILL if server == "redis" else 1), output
        assert not programs(marker)
        assert not (data_dir / "postgres.pid").exists() and not (data_dir / "redis.pid").exists()
    finally:
        finish(proc, marker)
        from app.embedded import EmbeddedPostgres

        EmbeddedPostgres(data_dir).stop_leftover()  # a launcher the test killed left it running


# --- what a launcher killed outright leaves behind ---------------------------------------------

ZOMBIE_LEADER = textwrap.dedent("""
    import ctypes, platform, signal, socket, sys, threading
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a program blocked writing its last lines
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", int(sys.argv[1])))
    sock.listen()
    threading.Thread(target=threading.Event().wait).start()
    print("listening", flush=True)
    # The main thread alone exits (exit, not exit_group): the group's leader is a zombie while
    # its other thread runs on, holding the socket.
    ctypes.CDLL(None).syscall({"x86_64": 60, "aarch64": 93}[platform.machine()], 0)
""")


def test_a_leftover_whose_zombie_leader_still_has_threads_is_killed(tmp_path: Path) -> None:
    """The next run found a killed launcher's Flower as a zombie leader whose other threads still
    held its port, counted the group as gone, sent no SIGKILL, and failed: port in use."""
    port = free_port()
    leader = subprocess.Popen([sys.executable, "-c", ZOMBIE_LEADER, str(port)],
                              stdout=subprocess.PIPE, start_new_session=True)
    dead_owner = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_owner.wait()
    try:
        assert leader.stdout is not None and leader.stdout.readline() == b"listening\n"
        wait_for(lambda: psutil.Process(leader.pid).status() == psutil.STATUS_ZOMBIE, START_TIMEOUT,
                 "the leader to be a zombie")
        assert launcher._port_in_use("127.0.0.1", port)
        write_pidfile(tmp_path / launcher.FLEET_FILE, {
            "owner_pid": dead_owner.pid, "owner_started": 0.0,
            "groups": [[leader.pid, create_time(leader.pid)]], "helpers": [],
        })
        launcher.claim_data_dir(tmp_path)
        assert not launcher._port_in_use("127.0.0.1", port)
        assert leader.wait(STOP_TIMEOUT) == -signal.SIGKILL
    finally:
        if leader.poll() is None:
            os.killpg(leader.pid, signal.SIGKILL)
            leader.wait()


OWNER_OF_SERVERS = textwrap.dedent("""
    import sys, threading
    from pathlib import Path
    from app.embedded import EmbeddedPostgres, EmbeddedRedis, owner_record, write_pidfile
    data_dir = Path(sys.argv[1])
    postgres, redis = EmbeddedPostgres(data_dir), EmbeddedRedis(data_dir)
    postgres.start()
    redis.start()
    write_pidfile(data_dir / "fleet.pid", {**owner_record(), "groups": [], "helpers": []})
    print(postgres.pid, redis.pid, flush=True)
    threading.Event().wait()
""")


def test_a_run_refused_for_a_port_in_use_leaves_no_server_a_killed_run_left(tmp_path: Path) -> None:
    """A launcher killed outright leaves its PostgreSQL running (pg_ctl daemonizes it). The next
    run, refused because a port is in use, must not leave it behind either: it is stopped before
    the ports are checked."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", OWNER_OF_SERVERS, str(data_dir)],
                             cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert owner.stdout is not None
        postgres_pid, redis_pid = (int(pid) for pid in owner.stdout.readline().split())
        owner.kill()
        owner.wait()
        postmaster = psutil.Process(postgres_pid)
        assert not gone(postmaster)
        with socket.socket() as taken:
            taken.bind(("0.0.0.0", 0))
            taken.listen()
            port = taken.getsockname()[1]
            run = subprocess.run(
                [*dunning_command(), "run", "--data-dir", str(data_dir)], cwd=REPO,
                capture_output=True, text=True, timeout=60,
                env=fleet_env(PORT=str(port), FLOWER_PORT=str(free_port())),
            )
        assert run.returncode == 1, run.stdout + run.stderr
        assert f"port {port} is in use" in run.stderr
        assert gone(postmaster)
        assert not psutil.pid_exists(redis_pid) or gone(psutil.Process(redis_pid))
        assert not (data_dir / "postgres.pid").exists()
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        from app.embedded import EmbeddedPostgres

        EmbeddedPostgres(data_dir).stop_leftover()


# --- Flower and ports ---------------------------------------------------------------------------


def test_flower_beyond_loopback_requires_basic_auth_and_keeps_its_api_closed() -> None:
    """Flower's API applies any task (tasks.retry_payment charges cards) and shuts workers down."""
    assert launcher.flower_api_env({}, "127.0.0.1", 5555) == {"FLOWER_UNAUTHENTICATED_API": "true"}
    assert launcher.flower_api_env({"FLOWER_UNAUTHENTICATED_API": "false"}, "localhost", 5555) == {
        "FLOWER_UNAUTHENTICATED_API": "false"}
    for host in ("::1", "[::1]", "LOCALHOST", "127.0.0.2"):  # loopback by address, not by spelling
        assert launcher.flower_api_env({}, host, 5555) == {"FLOWER_UNAUTHENTICATED_API": "true"}
    for host in ("0.0.0.0", "192.168.1.20", "127.corp.example"):  # a name may resolve anywhere
        with pytest.raises(launcher.LaunchError, match="set FLOWER_BASIC_AUTH=user:password"):
            launcher.flower_api_env({"FLOWER_UNAUTHENTICATED_API": "true"}, host, 5555)
        assert launcher.flower_api_env({"FLOWER_BASIC_AUTH": "ops:secret"}, host, 5555) == {
            "FLOWER_UNAUTHENTICATED_API": "false"}


def test_make_run_refuses_an_open_flower_api_on_every_address(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*dunning_command(), "run", "--data-dir", str(tmp_path / "data")], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=fleet_env(FLOWER_ADDRESS="0.0.0.0", PORT=str(free_port()), FLOWER_PORT=str(free_port())),
    )
    try:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 1, out + err
        assert "FLOWER_BASIC_AUTH" in err
    finally:
        if proc.poll() is None:  # it started the fleet: stop it, everything it started with it
            proc.send_signal(signal.SIGTERM)
            proc.wait(STOP_TIMEOUT)


def test_make_run_refuses_a_flower_unauthenticated_api_flower_cannot_read(tmp_path: Path) -> None:
    """Flower reads the value on every request without a login and raised ValueError for any word
    other than true/false and their kin: with `enabled`, Flower ran and answered nothing."""
    procfile = tmp_path / "Procfile"
    procfile.write_text("flower: exec sleep 1\n")
    run = subprocess.run(
        [*dunning_command(), "run", "--data-dir", str(tmp_path / "data")], cwd=REPO,
        capture_output=True, text=True, timeout=60,
        env=fleet_env(DUNNING_PROCFILE=str(procfile), FLOWER_UNAUTHENTICATED_API="enabled",
                      FLOWER_PORT=str(free_port())),
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FLOWER_UNAUTHENTICATED_API must be true or false" in run.stderr and "'enabled'" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "data" / "pg").exists()  # refused before the private servers started


@pytest.mark.parametrize("address", ["203.0.113.7", "flower.invalid"])
def test_a_flower_address_this_machine_cannot_listen_on_is_named_for_what_it_is(
    tmp_path: Path, address: str,
) -> None:
    """An address of no interface here (another machine's, a typo) or a name that does not resolve:
    make run said "port 5555 is in use; choose another with FLOWER_PORT", sending the user after
    the wrong setting."""
    procfile = tmp_path / "Procfile"
    procfile.write_text("flower: exec sleep 1\n")
    flower_port = free_port()
    run = subprocess.run(
        [*dunning_command(), "run", "--data-dir", str(tmp_path / "data")], cwd=REPO,
        capture_output=True, text=True, timeout=60,
        env=fleet_env(DUNNING_PROCFILE=str(procfile), FLOWER_ADDRESS=address, FLOWER_BASIC_AUTH="ops:secret",
                      FLOWER_PORT=str(flower_port)),
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "in use" not in run.stderr
    assert f"Flower cannot listen on {address}:{flower_port}" in run.stderr
    assert "FLOWER_ADDRESS" in run.stderr
    assert not (tmp_path / "data" / "pg").exists()  # refused before the private servers started


def test_the_procfile_opens_flowers_api_only_on_loopback() -> None:
    """The Procfile's default, for every runner of it (`dunning process flower`, honcho, foreman)."""
    command = launcher.procfile_processes({})["flower"].replace(
        "exec celery -A tasks flower", "exec sh -c 'echo \"$FLOWER_UNAUTHENTICATED_API\"'")

    def api(**env: str) -> str:
        result = subprocess.run(["sh", "-c", command], env={"PATH": os.environ["PATH"], **env},
                                capture_output=True, text=True, check=True)
        return result.stdout.strip()

    assert api() == "true"
    assert api(FLOWER_ADDRESS="127.0.0.1") == "true"
    assert api(FLOWER_ADDRESS="localhost") == "true"
    assert api(FLOWER_ADDRESS="0.0.0.0") == "false"
    assert api(FLOWER_ADDRESS="0.0.0.0", FLOWER_UNAUTHENTICATED_API="false") == "false"
    assert api(FLOWER_ADDRESS="127.0.0.1", FLOWER_UNAUTHENTICATED_API="false") == "false"


def test_two_servers_of_the_fleet_on_one_port_are_refused() -> None:
    processes = launcher.procfile_processes({})
    ports = {"PORT": 5000, "FLOWER_PORT": 5555, "WORKER_METRICS_PORT": 9808}
    launcher.check_ports(processes, ports)
    with pytest.raises(launcher.LaunchError, match="PORT and FLOWER_PORT are both 5000"):
        launcher.check_ports(processes, {**ports, "FLOWER_PORT": 5000})
    with pytest.raises(launcher.LaunchError, match="FLOWER_PORT and WORKER_METRICS_PORT are both 5555"):
        launcher.check_ports(processes, {**ports, "WORKER_METRICS_PORT": 5555})
    launcher.check_ports({"web": "x", "worker": "y"}, {**ports, "FLOWER_PORT": 5000})  # no Flower


def test_a_worker_metrics_port_the_worker_does_not_serve_on_is_no_clash() -> None:
    """0 (any free port): the worker serves on no fixed port, so there is nothing to clash with."""
    processes = launcher.procfile_processes({})
    ports = {"PORT": 5000, "FLOWER_PORT": 5555, **launcher._worker_metrics_port({"WORKER_METRICS_PORT": "0"})}
    launcher.check_ports(processes, ports)
    assert launcher._worker_metrics_port({}) == {"WORKER_METRICS_PORT": launcher.DEFAULT_WORKER_METRICS_PORT}
    with pytest.raises(launcher.LaunchError, match="WORKER_METRICS_PORT"):
        launcher.check_ports(processes, {"PORT": 5000, "FLOWER_PORT": 5555,
                                         **launcher._worker_metrics_port({"WORKER_METRICS_PORT": "5000"})})


@pytest.mark.parametrize("value", ["off", "\u00b2", "70000", "-1"])  # '²': a digit to str.isdigit(), not to int()
def test_a_worker_metrics_port_that_is_no_port_is_refused_naming_the_variable(tmp_path: Path, value: str) -> None:
    """make run started, and its worker logged an error and served no metrics. Refused at the start now,
    as PORT is, before the private servers start."""
    procfile = tmp_path / "Procfile"
    procfile.write_text("worker: exec sleep 1\n")
    run = subprocess.run(
        [*dunning_command(), "run", "--data-dir", str(tmp_path / "data")], cwd=REPO,
        capture_output=True, text=True, timeout=60,
        env=fleet_env(DUNNING_PROCFILE=str(procfile), WORKER_METRICS_PORT=value),
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"WORKER_METRICS_PORT must be a port number, got {value!r}" in run.stderr
    assert not (tmp_path / "data" / "pg").exists()


def test_a_worker_metrics_port_in_use_is_refused_naming_the_variable(tmp_path: Path) -> None:
    """A second `make run` (another data folder) found 9808 taken by the first run's worker: it started,
    and its worker logged an error and served no metrics. Refused at the start now, as PORT and
    FLOWER_PORT are, naming the setting; before the private servers start."""
    procfile = tmp_path / "Procfile"
    procfile.write_text("worker: exec sleep 1\n")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run(
            [*dunning_command(), "run", "--data-dir", str(tmp_path / "data")], cwd=REPO,
            capture_output=True, text=True, timeout=60,
            env=fleet_env(DUNNING_PROCFILE=str(procfile), WORKER_METRICS_PORT=str(port)),
        )
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"port {port} is in use; choose another with WORKER_METRICS_PORT=" in run.stderr
    assert not (tmp_path / "data" / "pg").exists()
    # An address of no interface here is named for what it is, not as a port in use.
    with pytest.raises(launcher.LaunchError, match=r"cannot listen on 203\.0\.113\.7:.*set WORKER_METRICS_ADDR"):
        launcher.check_worker_metrics_port({"WORKER_METRICS_ADDR": "203.0.113.7",
                                            "WORKER_METRICS_PORT": str(free_port())}, 0.0)
