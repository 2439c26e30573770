"""`dunning process flower` (what deployments run) refuses to open Flower beyond loopback without a login,
as `dunning run` does: its pages list every task's arguments and results (account ids, their dunning
state), whatever FLOWER_UNAUTHENTICATED_API says about its API."""

from __future__ import annotations

from typing import Any

import pytest

from app import cli


@pytest.fixture
def execs(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """os.execvpe recorded instead of run (the process would become Flower)."""
    calls: list[Any] = []
    monkeypatch.setattr(cli.os, "execvpe", lambda *a: calls.append(a))
    for name in ("FLOWER_ADDRESS", "FLOWER_BASIC_AUTH", "FLOWER_AUTH", "FLOWER_UNAUTHENTICATED_API"):
        monkeypatch.delenv(name, raising=False)
    # Flower builds the Celery app, which reads the settings: `dunning process` checks them first
    # (nothing connects to it).
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1/postgres")
    monkeypatch.delenv("DUNNING_POLICY", raising=False)
    return calls


def test_flower_beyond_loopback_without_a_login_is_refused(execs, monkeypatch, capsys):
    monkeypatch.setenv("FLOWER_ADDRESS", "0.0.0.0")
    monkeypatch.setenv("FLOWER_UNAUTHENTICATED_API", "false")
    assert cli.main(["process", "flower"]) == 2
    assert execs == []
    assert "FLOWER_BASIC_AUTH" in capsys.readouterr().err


@pytest.mark.parametrize("env", [{"FLOWER_ADDRESS": "0.0.0.0", "FLOWER_BASIC_AUTH": "admin:long-password"},
                                 {"FLOWER_ADDRESS": "127.0.0.1"}, {}])
def test_flower_with_a_login_or_on_loopback_starts(execs, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cli.main(["process", "flower"])
    assert len(execs) == 1 and "celery -A tasks flower" in execs[0][1][2]
