"""The private PostgreSQL and Redis servers (app.embedded): real processes in a temp folder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import psutil
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import create_engine, text

from app.config import normalize_database_url
from app.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    EmbeddedServerError,
    _pgserver,
    create_time,
    free_port,
    redis_executable,
    wait_for,
    write_pidfile,
)

# For a server or backend to exit, which it will: far off (a loaded machine's shutdown, its
# checkpoint or dump, can take seconds).
EXIT_TIMEOUT = 60.0


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def sql(url: str, statement: str) -> object:
    engine = create_engine(normalize_database_url(url))
    try:
        with engine.begin() as conn:
            result = conn.execute(text(statement))
            return result.scalar() if result.returns_rows else None
    finally:
        engine.dispose()


def start_owner(tmp_path: Path, kind: str) -> tuple[subprocess.Popen[bytes], int]:
    """Another process that starts a server under tmp_path and keeps it; returns (owner, server
    pid)."""
    pid_out = tmp_path / f"{kind}-server.pid"
    script = textwrap.dedent(f"""
        import sys, threading
        from pathlib import Path
        from app.embedded import Embedded{kind}
        server = Embedded{kind}(Path({str(tmp_path)!r}))
        server.start()
        Path({str(pid_out)!r}).write_text(str(server.pid))
        threading.Event().wait()
    """)
    owner = subprocess.Popen([sys.executable, "-c", script])
    wait_for(lambda: pid_out.exists() or owner.poll() is not None, 60, f"{kind} owner")
    assert owner.poll() is None, f"the {kind} owner process failed"
    return owner, int(pid_out.read_text())


def test_both_servers_start_stop_and_reuse_the_folder(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path)
    rd = EmbeddedRedis(tmp_path)
    url = pg.start()
    broker = rd.start()
    try:
        assert url.startswith("postgresql://")
        assert url == pg.url
        assert broker == rd.url
        assert broker.startswith("redis://:") and broker.endswith(f"@127.0.0.1:{rd.port}/0")
        sql(url, "CREATE TABLE kept (v text)")
        sql(url, "INSERT INTO kept VALUES ('survives a restart')")
        client = redis.Redis.from_url(broker)
        assert client.ping()
        client.set("kept", "in the RDB snapshot")
        client.close()
        pg_pid, redis_pid = pg.pid, rd.pid
        assert pg_pid and redis_pid
        # PostgreSQL 16, as data folders made by earlier releases hold (another major version
        # could not serve them).
        assert (tmp_path / "pg" / "PG_VERSION").read_text().strip() == "16"
        assert int(str(sql(url, "SHOW server_version_num"))) // 10000 == 16
    finally:
        rd.stop()
        pg.stop()
    wait_for(lambda: gone(pg_pid) and gone(redis_pid), EXIT_TIMEOUT, "both servers to exit")
    rd.stop()  # idempotent
    pg.stop()
    with pytest.raises(EmbeddedServerError):
        _ = pg.url

    pg2, rd2 = EmbeddedPostgres(tmp_path), EmbeddedRedis(tmp_path)
    try:
        url2 = pg2.start()
        assert sql(url2, "SELECT v FROM kept") == "survives a restart"
        client = redis.Redis.from_url(rd2.start())
        assert client.get("kept") == b"in the RDB snapshot"
        client.close()
    finally:
        rd2.stop()
        pg2.stop()
    assert not (tmp_path / "postgres.pid").exists()
    assert not (tmp_path / "redis.pid").exists()


def test_a_postgres_left_by_a_killed_owner_is_stopped_on_next_start(tmp_path: Path) -> None:
    owner, stale_pid = start_owner(tmp_path, "Postgres")
    try:
        # While its owner lives, the server is not ours to take.
        with pytest.raises(EmbeddedServerError, match="in use by process"):
            EmbeddedPostgres(tmp_path).start()
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        assert not gone(stale_pid), "pg_ctl daemonizes PostgreSQL: it outlives its owner"
        pg = EmbeddedPostgres(tmp_path)
        try:
            url = pg.start()
            assert gone(stale_pid)
            assert pg.pid != stale_pid
            assert sql(url, "SELECT 1") == 1
        finally:
            pg.stop()
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux")
def test_redis_dies_with_its_owner(tmp_path: Path) -> None:
    owner, redis_pid = start_owner(tmp_path, "Redis")
    try:
        with pytest.raises(EmbeddedServerError, match="in use by process"):
            EmbeddedRedis(tmp_path).start()
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        wait_for(lambda: gone(redis_pid), EXIT_TIMEOUT, "the orphaned Redis to exit")
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


def test_a_redis_left_running_is_stopped_on_next_start(tmp_path: Path) -> None:
    # A leftover as a crash on a system without parent-death signals would leave it: a Redis
    # server, and a pid file whose owner is gone.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    port = free_port()
    (tmp_path / "redis").mkdir()
    stale = subprocess.Popen(
        [str(redis_executable()), "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        write_pidfile(tmp_path / "redis.pid", {
            "owner_pid": dead.pid, "owner_started": None,
            "server_pid": stale.pid, "server_started": create_time(stale.pid), "port": port,
        })
        rd = EmbeddedRedis(tmp_path)
        try:
            url = rd.start()
            assert stale.poll() is not None, "the leftover server was not stopped"
            assert redis.Redis.from_url(url).ping()
        finally:
            rd.stop()
    finally:
        if stale.poll() is None:
            os.kill(stale.pid, signal.SIGKILL)
        stale.wait()


def test_redis_on_a_taken_port_fails_clearly(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "a") as first:
        with pytest.raises(EmbeddedServerError, match="port in use"):
            EmbeddedRedis(tmp_path / "b", port=first.port).start()
        assert not (tmp_path / "b" / "redis.pid").exists()


def test_the_private_redis_lets_in_only_clients_that_know_its_password(tmp_path: Path) -> None:
    """It listens on a 127.0.0.1 port, which every user of the machine can reach: without a
    password any of them could read the queued tasks or queue tasks.retry_payment. The password
    is generated once and kept in a file only this user can read, never on the command line (ps)."""
    data_dir = tmp_path / "data dir"
    rd = EmbeddedRedis(data_dir)
    url = rd.start()
    try:
        assert rd.port is not None
        stranger = redis.Redis(host="127.0.0.1", port=rd.port, retry=Retry(NoBackoff(), 0))
        with pytest.raises(redis.AuthenticationError):
            stranger.ping()
        stranger.close()
        password = redis.connection.parse_url(url).get("password")
        assert password and len(password) >= 32
        client = redis.Redis.from_url(url)
        assert client.ping()
        client.close()
        assert rd.pid is not None
        assert password not in " ".join(psutil.Process(rd.pid).cmdline())
        keeper = [path for path in data_dir.rglob("*")
                  if path.is_file() and password in path.read_text(errors="replace")]
        assert keeper, "the password is kept in the data folder"
        for path in keeper:
            assert path.stat().st_mode & 0o777 == 0o600, path
        assert (data_dir / "redis").stat().st_mode & 0o777 == 0o700
    finally:
        rd.stop()
    # A later run keeps it (anything configured with it, a redis-cli, keeps working).
    again = EmbeddedRedis(data_dir)
    try:
        assert redis.connection.parse_url(again.start()).get("password") == password
    finally:
        again.stop()


def test_postgres_runs_in_a_data_folder_whose_path_has_a_space(tmp_path: Path) -> None:
    """pgserver hands postgres its socket directory unquoted: a folder with a space cannot hold the
    socket, so it goes to a private temp folder (app.embedded._socket_dir_without_spaces)."""
    pg = EmbeddedPostgres(tmp_path / "my data")
    url = pg.start()
    try:
        assert " " not in url
        assert sql(url, "SELECT 1") == 1
        assert (tmp_path / "my data" / "pg" / "PG_VERSION").exists()
    finally:
        pg.stop()


def test_the_private_postgres_opens_no_folder_above_its_data_folder_to_listing(tmp_path: Path) -> None:
    """As root, pgserver runs PostgreSQL as its own user and made every folder above the data folder
    readable by everyone (g+rx,o+rx) for that user to reach it: `make run` as root in a checkout
    under /root let every local user list /root. The server's user needs to pass through them only."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    pg = EmbeddedPostgres(home / "checkout" / ".dunning")
    url = pg.start()
    try:
        assert sql(url, "SELECT 1") == 1
    finally:
        pg.stop()
    assert home.stat().st_mode & 0o044 == 0, oct(home.stat().st_mode)


@pytest.mark.parametrize("where", ["a space", "a long path"])
def test_the_private_postgres_socket_outside_its_folder_lets_in_only_this_user(tmp_path: Path, where: str) -> None:
    """Its socket lets anyone who can connect in as superuser, with no password (trust). When it
    cannot be in PGDATA (0700: a path with a space, or one too long for a socket name), it goes to
    a folder in /tmp, which pgserver makes (or, as root, chmods) 0777: the socket itself must let
    only its owner connect (root, whom pgserver's postgres user serves, passes any mode)."""
    data_dir = tmp_path / ("my data" if where == "a space" else "d" * 100)
    pg = EmbeddedPostgres(data_dir)
    url = pg.start()
    try:
        socket_dir = Path(unquote(url.partition("host=")[2].partition("&")[0]))
        assert not socket_dir.is_relative_to(data_dir)
        (sock,) = socket_dir.glob(".s.PGSQL.*[0-9]")
        assert sock.stat().st_mode & 0o077 == 0, oct(sock.stat().st_mode)
        assert sql(url, "SELECT 1") == 1
        # Nor may anyone else put a socket of their own in its place (the folder's mode).
        assert_private_socket_folder(socket_dir)
    finally:
        pg.stop()
        if "socket_dir" in locals():
            shutil.rmtree(socket_dir, ignore_errors=True)  # under /tmp, not tmp_path


def assert_private_socket_folder(folder: Path) -> None:
    """Only the server's user may enter the folder (root, whom pgserver's postgres user serves,
    passes any mode)."""
    import pwd
    import stat

    info = folder.lstat()
    assert stat.S_ISDIR(info.st_mode)
    server_uid = pwd.getpwnam("pgserver").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert (info.st_uid, info.st_mode & 0o777) == (server_uid, 0o700), (info.st_uid, oct(info.st_mode))


def test_a_socket_folder_made_first_open_to_others_is_taken_back(tmp_path: Path) -> None:
    """The socket folder's name under /tmp shows in `ps` (postgres -k ...) and outlives a /tmp
    cleanup: another user could make it first, and own the folder the fleet's socket is in. As
    root the folder is made another user's (nobody's) and taken back; any other user cannot give
    a folder away, so there it is its own, left open to everyone (0777), and made private."""
    pg = EmbeddedPostgres(tmp_path / "my data")
    url = pg.start()
    pg.stop()
    socket_dir = Path(unquote(url.partition("host=")[2].partition("&")[0]))
    shutil.rmtree(socket_dir)
    socket_dir.mkdir()
    if os.geteuid() == 0:
        os.chown(socket_dir, 65534, 65534)  # nobody's
    socket_dir.chmod(0o777)
    again = EmbeddedPostgres(tmp_path / "my data")
    try:
        assert again.start() == url
        assert_private_socket_folder(socket_dir)
    finally:
        again.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)  # under /tmp, not tmp_path


def pgdata_processes(pgdata: Path) -> list[psutil.Process]:
    """Processes at work on ``pgdata`` (initdb, pg_ctl, the postmaster)."""
    return [p for p in psutil.process_iter(["name", "cmdline"])
            if str(pgdata) in (p.info["cmdline"] or []) and not gone(p.pid)]


def interrupt_in(monkeypatch: pytest.MonkeyPatch, program: str, when: Callable[[], bool]) -> None:
    """Ctrl-C lands while pgserver runs ``program`` (initdb, pg_ctl), once ``when()`` holds:
    subprocess.run then kills the program and the KeyboardInterrupt goes on up, as in the
    launcher (whose SIGINT/SIGTERM handler raises a KeyboardInterrupt)."""
    module = _pgserver().postgres_server
    real = module.pgexec

    def pgexec(command: str, args: Any, bin_path: Path, **kwargs: Any) -> str:
        if command != program:
            return str(real(command, args, bin_path, **kwargs))
        kwargs.pop("timeout", None)
        proc = subprocess.Popen([str(bin_path / command), *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, **kwargs)
        try:
            wait_for(lambda: when() or proc.poll() is not None, 30, f"{program} under way")
            assert proc.poll() is None, f"{program} ended before the interrupt"
        finally:
            proc.kill()
            proc.wait()
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "pgexec", pgexec)


def test_a_start_interrupted_while_pg_ctl_starts_postgres_leaves_no_server(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM while the private PostgreSQL starts: pg_ctl is killed, but the postmaster it
    forked runs on by itself. start() caught only Exception and stop() stopped nothing (no URL,
    no pid yet), so it was left running while the launcher said "Postgres: stopped"."""
    first = EmbeddedPostgres(tmp_path)  # the cluster exists: this is a later run
    first.start()
    first.stop()
    pgdata = tmp_path / "pg"
    # the postmaster pg_ctl forked is there (perhaps not yet in postmaster.pid)
    interrupt_in(monkeypatch, "pg_ctl", lambda: any(
        p.info["name"] == "postgres" for p in pgdata_processes(pgdata)))
    pg = EmbeddedPostgres(tmp_path)
    try:
        with pytest.raises(KeyboardInterrupt):
            pg.start()
    finally:
        pg.stop()  # what the launcher does next
    assert not pgdata_processes(pgdata)
    assert not (tmp_path / "postgres.pid").exists()


def test_a_first_start_interrupted_in_initdb_leaves_a_folder_the_next_start_uses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during the very first start, while initdb runs: initdb is killed half-way and leaves
    a cluster with PG_VERSION but no postgres database. The next start must not serve it."""
    pgdata = tmp_path / "pg"
    interrupt_in(monkeypatch, "initdb", lambda: (pgdata / "PG_VERSION").exists())
    pg = EmbeddedPostgres(tmp_path)
    try:
        with pytest.raises(KeyboardInterrupt):
            pg.start()
    finally:
        pg.stop()
    assert (pgdata / "PG_VERSION").exists()  # what initdb left
    wait_for(lambda: not pgdata_processes(pgdata), EXIT_TIMEOUT, "initdb's backend to exit")
    monkeypatch.undo()

    again = EmbeddedPostgres(tmp_path)
    try:
        url = again.start()
        assert sql(url, "SELECT current_database()") == "postgres"
    finally:
        again.stop()


def test_a_stale_postmaster_pid_never_stops_a_process_serving_another_folder(tmp_path: Path) -> None:
    """pg/postmaster.pid left by a postmaster of this folder that died long ago (kill -9, a reboot),
    its pid since reused by a process named postgres that serves something else (another checkout's
    cluster, another user's): every `make run` looks for leftovers, and must leave it alone."""
    import shutil

    fake = tmp_path / "bin" / "postgres"  # stands for another cluster's postmaster
    fake.parent.mkdir()
    shutil.copy("/bin/sleep", fake)
    other = subprocess.Popen([str(fake), "300"], cwd=tmp_path)
    try:
        pgdata = tmp_path / "data" / "pg"
        pgdata.mkdir(parents=True)
        (pgdata / "PG_VERSION").write_text("16\n")
        (pgdata / "postmaster.pid").write_text(f"{other.pid}\n{pgdata}\n1700000000\n5432\n")
        EmbeddedPostgres(tmp_path / "data").stop_leftover()
        assert other.poll() is None, f"an unrelated process was stopped (rc={other.returncode})"
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("left", ["names a live process", "cut short"])
def test_a_stale_postmaster_pid_does_not_keep_postgres_from_starting(tmp_path: Path, left: str) -> None:
    """pg/postmaster.pid outlives a postmaster killed outright (the OOM killer, a reboot, a container
    restart). pgserver takes any live process the file names (its pid reused since: a daemon, the
    launcher itself after a container restart) for a running server and hands out its socket, where
    nothing listens: every `make run` then failed with "database unreachable; check DATABASE_URL".
    A file cut short (the postmaster killed while it wrote it) failed every start on pgserver's
    assertion. Nothing of the cluster runs: the file is stale, and the server must start."""
    with EmbeddedPostgres(tmp_path):  # a cluster made, then stopped cleanly
        pass
    pgdata = tmp_path / "pg"
    other = subprocess.Popen(["sleep", "300"])  # holds the pid the stale file names
    try:
        lines = [str(other.pid), str(pgdata), "1700000000", "5432", str(pgdata), "", "  5432001  32768", "ready"]
        if left == "cut short":
            lines = lines[:4]
        (pgdata / "postmaster.pid").write_text("\n".join(lines) + "\n")
        pg = EmbeddedPostgres(tmp_path)
        try:
            url = pg.start()
            assert sql(url, "SELECT 1") == 1
            assert pg.pid != other.pid
        finally:
            pg.stop()
        assert other.poll() is None, "the process the stale file named was stopped"
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("postmaster_pid", ["left too", "removed by a start that failed"])
def test_a_stale_socket_lock_file_does_not_keep_postgres_from_starting(tmp_path: Path, postmaster_pid: str) -> None:
    """Beside postmaster.pid, a postmaster killed outright leaves its socket's lock file
    (.s.PGSQL.5432.lock, with its pid). Once that pid names a live process of the server's user (the
    launcher itself after a container restart, for an ordinary user), PostgreSQL refuses to start
    ("lock file already exists"): postmaster.pid was discarded, the socket's lock was not, and every
    `make run` failed."""
    with EmbeddedPostgres(tmp_path):  # a cluster made, then stopped cleanly
        pass
    pgdata = tmp_path / "pg"
    # Whom pgserver runs postgres as: holds the pid the stale files name.
    other = subprocess.Popen(["sleep", "300"], user="pgserver" if os.geteuid() == 0 else None)
    try:
        (pgdata / ".s.PGSQL.5432.lock").write_text(f"{other.pid}\n{pgdata}\n1700000000\n5432\n{pgdata}\n")
        if postmaster_pid == "left too":
            (pgdata / "postmaster.pid").write_text(
                f"{other.pid}\n{pgdata}\n1700000000\n5432\n{pgdata}\n\n  5432001  32768\nready\n")
        pg = EmbeddedPostgres(tmp_path)
        try:
            url = pg.start()
            assert sql(url, "SELECT 1") == 1
        finally:
            pg.stop()
        assert other.poll() is None, "the process the stale files named was stopped"
    finally:
        other.kill()
        other.wait()


def test_a_postgres_slow_to_accept_connections_is_waited_for(tmp_path: Path) -> None:
    """After an unclean stop PostgreSQL replays its WAL before it accepts connections, which may take
    longer than the 10 s pgserver gives pg_ctl: the start failed, the launcher stopped the server
    mid-recovery, and the next run started the same recovery over, and failed the same way. Here a
    recovery slowed by its restore_command (each call takes 6 s) stands for a long one."""
    with EmbeddedPostgres(tmp_path) as first:
        url = first.url
        sql(url, "CREATE TABLE kept (v text)")
        sql(url, "INSERT INTO kept VALUES ('recovered')")
    pgdata = tmp_path / "pg"
    with open(pgdata / "postgresql.auto.conf", "a") as conf:
        conf.write("restore_command = 'sleep 6; exit 1'\n")
    (pgdata / "recovery.signal").touch()
    pg = EmbeddedPostgres(tmp_path)
    try:
        assert sql(pg.start(), "SELECT v FROM kept") == "recovered"
    finally:
        pg.stop()


def test_postgres_starts_when_pgservers_machine_wide_lock_file_is_not_this_users(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pgserver serialises its starts and stops with one lock file for every user of the machine
    ($XDG_RUNTIME_DIR/python_PostgresServer/.lockfile, else /tmp/.lockfile). Once another user (root
    running the tests, a colleague's make run) has made it, an ordinary user's make run failed:
    'the embedded PostgreSQL did not start ([Errno 13] Permission denied: b'/tmp/.lockfile')'.
    The lock of a private server is its data folder's, which this user can write."""
    pg_module = _pgserver().postgres_server
    unusable = tmp_path / "shared-runtime"
    unusable.mkdir()  # a path this process cannot open as a file, as root cannot either
    monkeypatch.setattr(pg_module.PostgresServer, "_lock", pg_module.fasteners.InterProcessLock(unusable))
    data_dir = tmp_path / "data"
    pg = EmbeddedPostgres(data_dir)
    try:
        assert sql(pg.start(), "SELECT 1") == 1
    finally:
        pg.stop()
    assert (data_dir / "pgserver.lock").exists()
