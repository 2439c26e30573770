"""deploy/ runs what the Procfile says: every process of the Procfile is started by
``dunning process NAME`` in the image, the compose file and the Kubernetes manifests, so they cannot
drift from it (tests/integration/test_process_command.py runs that command). No container engine
runs here; these tests read the files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from app import launcher

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROCESSES = list(launcher.procfile_processes({}))


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]


def _k8s_container(name: str) -> dict[str, Any]:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / f"{name}.yaml").read_text()))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _k8s_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_the_procfile_names_the_four_processes() -> None:
    assert PROCESSES == ["web", "worker", "beat", "flower"]


def test_the_image_runs_the_procfile_web_process_by_default() -> None:
    (cmd,) = [line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line.startswith("CMD ")]
    assert json.loads(cmd.removeprefix("CMD ")) == ["dunning", "process", "web"]


@pytest.mark.parametrize("name", PROCESSES)
def test_compose_runs_the_procfile_process(name: str) -> None:
    assert _compose()[name]["command"] == ["dunning", "process", name]


@pytest.mark.parametrize("name", PROCESSES)
def test_kubernetes_runs_the_procfile_process(name: str) -> None:
    container = _k8s_container(name)
    assert container["command"] == ["dunning", "process", name]
    assert "args" not in container


def test_migrations_run_once_before_the_processes() -> None:
    services = _compose()
    assert services["migrate"]["command"] == ["dunning", "db", "upgrade"]
    for name in ("web", "worker", "beat"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    job = yaml.safe_load((DEPLOY / "k8s" / "migrate-job.yaml").read_text())
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["dunning", "db", "upgrade"]


def test_deployed_flower_listens_beyond_localhost_with_its_api_behind_auth() -> None:
    compose = _compose()["flower"]["environment"]
    k8s = _k8s_env(_k8s_container("flower"))
    for env in (compose, k8s):
        assert env["FLOWER_ADDRESS"] == "0.0.0.0"
        assert env["FLOWER_UNAUTHENTICATED_API"] == "false"
    assert "FLOWER_BASIC_AUTH" in compose


def test_the_worker_metrics_port_is_declared() -> None:
    assert "WORKER_METRICS_PORT:-9808" in launcher.procfile_processes({})["worker"]
    ports = {p["name"]: p["containerPort"] for p in _k8s_container("worker")["ports"]}
    assert ports["metrics"] == 9808


@pytest.mark.parametrize("name", ["SECRET_KEY", "FLOWER_PASSWORD"])
def test_compose_has_no_default_for_a_login_secret(name: str) -> None:
    """A trial default ("change-me") for Flower's login or the session key would be a known password
    on a Flower whose API can run tasks.retry_payment: compose refuses to start without them."""
    text = (DEPLOY / "docker-compose.yml").read_text()
    assert f"${{{name}:?" in text
    assert f"${{{name}:-" not in text and f"${{{name}-" not in text and f"${{{name}}}" not in text


def _seconds(duration: str) -> int:
    """A compose duration ("60s", "3m", "2m30s") in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and any(parts.groups()), duration
    h, m, s = (int(p or 0) for p in parts.groups())
    return h * 3600 + m * 60 + s


def _hard_time_limit(env: dict[str, str]) -> int:
    from app.config import DEFAULT_VISIBILITY_TIMEOUT, task_time_limits

    return task_time_limits(int(env.get("CELERY_VISIBILITY_TIMEOUT") or DEFAULT_VISIBILITY_TIMEOUT))[0]


def test_a_stopped_worker_is_given_longer_than_a_task_may_run() -> None:
    """SIGTERM starts the worker's warm shutdown: its running tasks finish. Killed before (compose's
    stop_grace_period, Kubernetes' terminationGracePeriodSeconds), a task still within its hard time
    limit dies mid-run and, acked late, runs again from the start on another worker. Compose gave 60 s
    against a hard limit of 117 s."""
    compose = _compose()["worker"]
    compose_env = {k: str(v) for k, v in compose["environment"].items()}
    assert _seconds(compose["stop_grace_period"]) > _hard_time_limit(compose_env)
    config = yaml.safe_load((DEPLOY / "k8s" / "configmap.yaml").read_text())["data"]
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "worker.yaml").read_text()))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > _hard_time_limit({**config, **_k8s_env(_k8s_container("worker"))})


@pytest.mark.parametrize("name", ["web", "worker"])
def test_kubernetes_starts_web_and_worker_only_on_a_migrated_database(name: str) -> None:
    """`kubectl apply -k` creates the migration Job and the Deployments together: nothing held web
    and worker back until it finished, so a release's pods ran its code on the previous schema (on
    a first install, on no tables at all: /readyz only asks for SELECT 1, so web took traffic).
    Each pod runs `dunning db upgrade` first, in an init container; replicas doing so at once wait
    for one another's advisory lock (tests/integration/test_migrate_concurrently.py)."""
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / f"{name}.yaml").read_text()))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (init,) = pod.get("initContainers", [])
    assert init["command"] == ["dunning", "db", "upgrade"] and "args" not in init
    assert init["image"] == container["image"]
    assert init["envFrom"] == container["envFrom"]


def test_the_kubernetes_worker_sizes_its_pool_to_the_pod_not_the_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --concurrency Celery starts one prefork child per CPU it may run on: in a pod that is
    every CPU of the node (no cpuset; the pod asks 500m), 32 or 64 children of ~50 MB each against a
    1 GiB memory limit (an OOM kill, then a restart loop) and as many database pools. The worker
    Deployment sets CELERY_WORKER_CONCURRENCY, which `celery worker` reads as its --concurrency."""
    from celery.bin import worker as worker_command
    from celery.bin.celery import celery

    env = _k8s_env(_k8s_container("worker"))
    assert 1 <= int(env["CELERY_WORKER_CONCURRENCY"]) <= 8

    seen: dict[str, Any] = {}

    def started(*_: Any, **options: Any) -> None:
        seen.update(options)

    monkeypatch.setattr(worker_command.worker, "callback", started)
    monkeypatch.setenv("CELERY_WORKER_CONCURRENCY", env["CELERY_WORKER_CONCURRENCY"])
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")  # read, never connected to
    with pytest.raises(SystemExit) as ended:  # (click's standalone mode)
        celery.main(["-A", "tasks", "worker"], prog_name="celery", auto_envvar_prefix="CELERY")
    assert ended.value.code == 0
    assert seen["concurrency"] == int(env["CELERY_WORKER_CONCURRENCY"])
