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


@pytest.mark.parametrize("value", ["enabled", "true ", "maybe"])
def test_a_flower_unauthenticated_api_flower_cannot_read_is_refused_naming_it(execs, monkeypatch, capsys, value):
    """Flower reads FLOWER_UNAUTHENTICATED_API on every request without a login (strtobool): any other
    value raised ValueError there, so every request was dropped unanswered (/healthcheck and /metrics
    included, a traceback each in Flower's log) while the process ran on."""
    monkeypatch.setenv("FLOWER_UNAUTHENTICATED_API", value)
    assert cli.main(["process", "flower"]) == 2
    assert execs == []
    err = capsys.readouterr().err
    assert err.startswith("error: FLOWER_UNAUTHENTICATED_API must be true or false (") and repr(value) in err
    assert "Traceback" not in err


@pytest.mark.parametrize("value", ["TRUE", "yes", "1", "False", "off", ""])
def test_a_flower_unauthenticated_api_flower_reads_is_taken(execs, monkeypatch, value):
    monkeypatch.setenv("FLOWER_UNAUTHENTICATED_API", value)
    cli.main(["process", "flower"])
    assert len(execs) == 1 and "celery -A tasks flower" in execs[0][1][2]


@pytest.mark.parametrize("address", ["[::1]", " ::1 "])
def test_an_ipv6_flower_address_written_as_in_a_url_is_given_to_flower_bare(execs, monkeypatch, address):
    """`dunning run` binds [::1] as ::1; `dunning process flower` passed '[::1]' to Flower, whose
    getaddrinfo found no such host: a traceback, and no Flower."""
    monkeypatch.setenv("FLOWER_ADDRESS", address)
    assert cli.main(["process", "flower"]) is None  # exec'd (recorded here)
    _program, _argv, env = execs[0]
    assert env["FLOWER_ADDRESS"] == "::1"


@pytest.mark.parametrize(("value", "entry"), [("admin-no-colon-pw9", 1), ("admin:pw9,ops:", 2),
                                              ("admin:pw9, ops:pw9", 2), ("admin:long-pw9\n", 1)])
def test_a_flower_login_nobody_could_give_is_refused_without_showing_it(execs, monkeypatch, capsys, value, entry):
    """Flower splits FLOWER_BASIC_AUTH at each comma and keeps every character: ' ops:pw' or a secret
    file's final newline made a login that never matched (every page and API call a 401), an entry
    with no ':' one that could not be given at all."""
    monkeypatch.setenv("FLOWER_ADDRESS", "0.0.0.0")
    monkeypatch.setenv("FLOWER_BASIC_AUTH", value)
    assert cli.main(["process", "flower"]) == 2
    assert execs == []
    err = capsys.readouterr().err
    assert err.startswith(f"error: FLOWER_BASIC_AUTH entry {entry} ") and "pw9" not in err
