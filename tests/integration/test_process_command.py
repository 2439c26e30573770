"""``dunning process NAME``: what the container images run (deploy/). It runs the Procfile's line for
NAME in place of itself, so the deployed processes start exactly as ``make run`` starts them
(metrics directories included), and the program itself receives the container's SIGTERM."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests

from app.policy_file import DEFAULT_POLICY
from tests.integration.processes import CELERY, DUNNING, ROOT, env_for, web_process


def test_a_name_the_procfile_lacks_is_refused_with_the_names_it_has() -> None:
    done = subprocess.run([DUNNING, "process", "api"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "no process 'api'" in done.stderr and "web, worker, beat, flower" in done.stderr
    assert "Traceback" not in done.stderr


def test_flower_beyond_loopback_with_a_port_that_is_no_number_is_refused_for_want_of_a_login() -> None:
    """The port is only named in the message: one that str.isdigit() takes and int() does not ('²')
    was a ValueError traceback in place of the refusal."""
    env = {"PATH": "/usr/bin:/bin", "FLOWER_ADDRESS": "0.0.0.0", "FLOWER_PORT": "\u00b2"}
    done = subprocess.run([DUNNING, "process", "flower"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr[-400:]
    assert done.stderr.startswith("error: FLOWER_ADDRESS=0.0.0.0") and "FLOWER_BASIC_AUTH" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_line_runs_in_place_of_the_command(tmp_path: Path) -> None:
    procfile = tmp_path / "Procfile"
    procfile.write_text("hello: exec \"$PYTHON\" -c 'import os; print(os.getpid(), os.environ[\"GREETING\"])'\n")
    env = {"PATH": "/usr/bin:/bin", "DUNNING_PROCFILE": str(procfile), "PYTHON": sys.executable, "GREETING": "hi"}
    proc = subprocess.Popen([DUNNING, "process", "hello"], stdout=subprocess.PIPE, text=True, env=env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert out.split() == [str(proc.pid), "hi"]  # no shell or launcher left between


def test_the_web_process_shares_metrics_across_its_workers_and_stops_on_sigterm(runtime, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics" / "web"
    metrics_dir.mkdir(parents=True)
    stale = metrics_dir / "counter_1.db"  # left by an earlier run of the same container
    stale.write_text("stale")
    with web_process(runtime.settings, tmp_path, WEB_CONCURRENCY="2") as web:
        assert not stale.exists()
        assert (tmp_path / "gunicorn.ctl").is_socket()  # this fleet's own, not one per user in ~/.gunicorn
        for _ in range(6):  # unsigned: refused, counted by whichever worker answers
            assert requests.post(f"{web.base}/webhooks/stripe", data=b"{}", timeout=5).status_code == 400
        assert list(metrics_dir.glob("counter_*.db"))
        scraped = requests.get(f"{web.base}/metrics", timeout=5)
        assert scraped.status_code == 200
        assert 'dunning_webhooks_rejected_total{reason="signature"} 6.0' in scraped.text  # both workers' counts
    assert web.returncode == 0  # gunicorn itself got the SIGTERM and shut down cleanly


@pytest.mark.parametrize("name", ["web", "worker"])
def test_a_bad_policy_file_stops_the_process_naming_the_key_without_a_traceback(name, settings,
                                                                                 tmp_path: Path) -> None:
    """What the images run (deploy/k8s: `dunning process NAME`) checks the settings and the policy
    file as `dunning run` does, before the Procfile's program starts: gunicorn and Celery showed the
    key's error at the end of a traceback (gunicorn's once per worker, then 'Worker failed to boot')."""
    policy = tmp_path / "policy.toml"
    policy.write_text(DEFAULT_POLICY.read_text().replace("window_minutes = 30", "window_minutes = 0"))
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": settings.database_url, "DUNNING_POLICY": str(policy),
           "DUNNING_DATA_DIR": str(tmp_path / "data"), "PORT": "0"}
    done = subprocess.run([DUNNING, "process", name], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-800:]
    assert done.stderr.startswith(f"error: policy file {policy}: policy key 'guard.window_minutes': must be at least 1")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("name", "value"), [("WEB_CONCURRENCY", "abc"), ("WEB_CONCURRENCY", "1.5"),
                                             ("WEB_CONCURRENCY", "0"), ("WEB_CONNECTIONS", "0")])
def test_a_web_count_gunicorn_cannot_use_stops_the_web_process_naming_it(settings, tmp_path: Path,
                                                                         name: str, value: str) -> None:
    """gunicorn reads WEB_CONCURRENCY itself with int(): 'abc' or '1.5' was its ValueError traceback.
    0 workers, or gevent workers taking 0 connections each, started a web process that answered
    nothing, with no word of why."""
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": settings.database_url,
           "DUNNING_DATA_DIR": str(tmp_path / "data"), "PORT": "0", name: value}
    done = subprocess.run([DUNNING, "process", "web"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-800:]
    assert done.stderr.startswith(f"error: {name} (") and f"must be a whole number of at least 1, got {value!r}" \
        in done.stderr
    assert "Traceback" not in done.stderr


def test_an_empty_web_concurrency_is_unset(runtime, tmp_path: Path) -> None:
    """A compose file's WEB_CONCURRENCY=${WEB_CONCURRENCY} with nothing set gives it empty: the
    Procfile's default took it as unset, gunicorn's own int('') stopped the process with a traceback."""
    with web_process(runtime.settings, tmp_path, WEB_CONCURRENCY="", WEB_CONNECTIONS=" ") as web:
        assert requests.get(f"{web.base}/healthz", timeout=5).status_code == 200
    assert web.returncode == 0


@pytest.mark.parametrize("program", ["worker", "beat", "flower"])
def test_a_bad_setting_stops_celery_as_any_procfile_runner_starts_it_in_one_line(settings, program: str) -> None:
    """`celery -A tasks worker|beat|flower`, as honcho or foreman run the Procfile's lines without
    `dunning process`: a setting every process refuses was Celery's "Unable to load celery
    application" and the traceback that ended with it."""
    env = env_for(settings, CELERY_VISIBILITY_TIMEOUT="abc")
    done = subprocess.run([CELERY, "-A", "tasks", program], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-800:]
    assert done.stderr == "error: CELERY_VISIBILITY_TIMEOUT must be a whole number of seconds\n"


def test_a_bad_setting_stops_the_procfile_s_web_line_in_one_line(settings, tmp_path: Path) -> None:
    """The Procfile's web line as honcho or foreman run it (gunicorn 'app:create_app()', without
    `dunning process`): a setting the web refuses was a traceback in every gunicorn worker, then
    "Worker failed to boot". One worker: with several, gunicorn 27's arbiter may itself end in a
    traceback of its HaltServer when a second worker fails while it halts (its own race, whatever
    the worker's exit status)."""
    from app.launcher import procfile_processes

    env = env_for(settings, CELERY_VISIBILITY_TIMEOUT="abc", DUNNING_DATA_DIR=str(tmp_path), PORT="0",
                  WEB_CONCURRENCY="1", PATH=f"{Path(CELERY).parent}:/usr/bin:/bin")
    done = subprocess.run(["sh", "-c", procfile_processes({})["web"]], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 4, done.stderr[-1500:]  # gunicorn's "App failed to load."
    assert "error: CELERY_VISIBILITY_TIMEOUT must be a whole number of seconds\n" in done.stderr
    assert "App failed to load" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-1500:]


@pytest.mark.parametrize(("name", "variable", "value"), [
    ("web", "PORT", "70000"), ("web", "PORT", "-1"),
    ("flower", "FLOWER_PORT", "abc"), ("flower", "FLOWER_PORT", "70000"),
    ("worker", "WORKER_METRICS_PORT", "abc"), ("worker", "WORKER_METRICS_PORT", "70000")])
def test_a_port_that_is_no_port_stops_the_process_naming_it(settings, tmp_path: Path, name: str, variable: str,
                                                           value: str) -> None:
    """`dunning run` refuses them; `dunning process` handed them on: gunicorn's OverflowError traceback,
    Flower's ValueError one, or Flower listening on another port (70000 became 4464) without a word;
    the worker ran, logged an error and served no metrics."""
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": settings.database_url, "CELERY_BROKER_URL": settings.broker_url,
           "DUNNING_DATA_DIR": str(tmp_path / "data"), variable: value}
    done = subprocess.run([DUNNING, "process", name], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr[-800:]
    assert done.stderr == f"error: {variable} must be a port number, got {value!r}\n"


def test_a_secret_key_of_blanks_only_stops_the_web_process_naming_it(settings, tmp_path: Path) -> None:
    """The Procfile's ${SECRET_KEY:-...} keeps a value of blanks only, and the web took it as the key
    signing every support session (a key anyone can guess)."""
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": settings.database_url, "CELERY_BROKER_URL": settings.broker_url,
           "DUNNING_DATA_DIR": str(tmp_path / "data"), "SECRET_KEY": "  \n"}
    done = subprocess.run([DUNNING, "process", "web"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr[-800:]
    assert done.stderr.startswith("error: SECRET_KEY is set but holds only blanks"), done.stderr[-800:]


@pytest.mark.parametrize("value", ["abc", "70000"])
def test_a_worker_metrics_port_that_is_no_port_stops_the_worker_in_one_line(settings, value: str) -> None:
    """`celery -A tasks worker` as any runner of the Procfile starts it: the worker ran, logged an error
    once ready and served no metrics, which nothing at its start said."""
    env = env_for(settings, WORKER_METRICS_PORT=value)
    done = subprocess.run([CELERY, "-A", "tasks", "worker", "--pool", "solo"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-800:]
    assert done.stderr == f"error: WORKER_METRICS_PORT must be a port number, got {value!r}\n"
