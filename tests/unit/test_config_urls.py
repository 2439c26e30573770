"""DATABASE_URL and CELERY_BROKER_URL: a malformed URL is a ConfigError at start that names the
variable and what is wrong, never a traceback on first use, and never quotes the URL (it holds the
password)."""

from __future__ import annotations

import pytest

from app.config import ConfigError, Settings

PASSWORD = "s3cr3t-pw"


def refused(**env: str) -> str:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"DATABASE_URL": "postgresql://nobody@127.0.0.1/x", **env})
    return str(err.value)


@pytest.mark.parametrize("url", [
    f"dunning:{PASSWORD}@db.internal:5432/dunning",          # the scheme forgotten
    f"postgresql//dunning:{PASSWORD}@db.internal/dunning",   # its ':' dropped
    f"postgresql:/dunning:{PASSWORD}@db.internal/dunning",   # one '/' dropped
    f"dunning:{PASSWORD}@db.internal://x",                   # what comes before '://' is no scheme
])
def test_a_database_url_without_a_scheme_is_refused_without_showing_it(url):
    """The error says the URL has no scheme; it never echoes the value, which holds the password."""
    message = refused(DATABASE_URL=url)
    assert "DATABASE_URL" in message and "has no scheme" in message
    assert PASSWORD not in message and "db.internal" not in message


def test_a_database_url_of_another_driver_names_its_scheme_only():
    message = refused(DATABASE_URL=f"postgresql+asyncpg://dunning:{PASSWORD}@db/x")
    assert "got the scheme 'postgresql+asyncpg'" in message and PASSWORD not in message


def test_a_port_that_is_not_a_number_is_refused_without_quoting_it():
    """An unencoded '@' in the password moves the rest of it into what the parser takes for the
    port: its own message (int()'s) would quote that part of the password."""
    message = refused(DATABASE_URL="postgresql://dunning:s3cr@et:pw-tail@db/x")
    assert "DATABASE_URL cannot be read: its port is not a number" in message and "%40" in message
    assert "pw-tail" not in message
