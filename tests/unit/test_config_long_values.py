"""An error about a setting quotes what it got: a value thousands of characters long (a 5,000-digit
number, a file pasted in place of a value) was quoted whole, an error line of that length in every
log and terminal. Quoted values are cut to a readable length, with how long they were."""

from __future__ import annotations

import pytest

from app.config import ConfigError, Settings
from app.launcher import _port, check_process_port, check_web_settings, flower_api_env

DB = "postgresql://nobody@127.0.0.1/x"
LONG_NUMBER = "9" * 4000
LONG_WORD = "x" * 5000


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"HISTORY_RETENTION_DAYS": LONG_NUMBER}, "HISTORY_RETENTION_DAYS"),
        ({"HISTORY_RETENTION_DAYS": LONG_WORD}, "HISTORY_RETENTION_DAYS"),
        ({"CELERY_VISIBILITY_TIMEOUT": "-" + LONG_NUMBER}, "CELERY_VISIBILITY_TIMEOUT"),
        ({"DATABASE_URL": f"{DB}?sslmode={LONG_WORD}"}, "sslmode"),
        ({"DATABASE_URL": f"{DB}?connect_timeout={LONG_WORD}"}, "connect_timeout"),
        ({"DATABASE_URL": f"{DB}?{LONG_WORD}=1"}, "DATABASE_URL"),
        ({"DATABASE_URL": f"postgresql://nobody@127.0.0.1/x?host=h1:{LONG_NUMBER}"}, "DATABASE_URL"),
        ({"DATABASE_URL": f"{LONG_WORD}://nobody@h/x"}, "DATABASE_URL"),
        ({"DATABASE_URL": f"{DB}?port={LONG_WORD}"}, "DATABASE_URL"),  # SQLAlchemy's message quotes it
    ],
)
def test_a_setting_s_error_quotes_at_most_the_beginning_of_a_long_value(env, name):
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"DATABASE_URL": DB, **env})
    message = str(err.value)
    assert name in message and "characters)" in message
    assert len(message) < 1000, message[:300]


@pytest.mark.parametrize(
    "check",
    [
        lambda: check_process_port({"PORT": LONG_WORD}, "web"),
        lambda: check_web_settings({"WEB_CONCURRENCY": "-" + LONG_NUMBER}),
        lambda: flower_api_env({"FLOWER_UNAUTHENTICATED_API": LONG_WORD}, "127.0.0.1", 5555),
        lambda: _port({"FLOWER_PORT": LONG_NUMBER}, "FLOWER_PORT", 5555),
    ],
)
def test_a_process_setting_s_error_quotes_at_most_the_beginning_of_a_long_value(check):
    with pytest.raises(Exception) as err:
        check()
    message = str(err.value)
    assert "characters)" in message and len(message) < 1000, message[:300]


def test_a_short_value_is_quoted_whole_as_before():
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"DATABASE_URL": DB, "HISTORY_RETENTION_DAYS": "ninety"})
    assert str(err.value) == "HISTORY_RETENTION_DAYS must be a whole number of days, got 'ninety'"
