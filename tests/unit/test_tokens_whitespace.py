"""SERVICE_TOKENS and SUPPORT_TOKENS are comma-separated. Written one per line (a YAML block in a
Kubernetes secret) or separated by spaces, the whole value was read as one token holding line
breaks or spaces: no caller can send it (a header holds no line break; a bearer token no space), so
every request was a 401 and nothing at start said why. A token holding whitespace or a control
character stops start-up, naming the setting and the entry's position, never the token, nor what reads
as its actor (a bare SERVICE_TOKENS token holding a ':' is read as name:token)."""

from __future__ import annotations

import pytest

from app.config import ConfigError, Settings, parse_service_tokens, parse_support_tokens

DB = "postgresql://nobody@127.0.0.1/x"


@pytest.mark.parametrize(
    ("name", "value", "entry", "actor"),
    [
        ("SERVICE_TOKENS", "svc-tok-one\nsvc-tok-two", 1, "service"),
        ("SERVICE_TOKENS", "billing:svc-tok-one\nreports:svc-tok-two", 1, "billing"),
        ("SERVICE_TOKENS", "svc-tok-one svc-tok-two", 1, "service"),
        ("SERVICE_TOKENS", "svc-tok-zero, svc-tok-one\tsvc-tok-two", 2, "service"),
        ("SERVICE_TOKENS", "svc-tok-one\x00", 1, "service"),
        ("SUPPORT_TOKENS", "alice:sup-tok-one\nbob:sup-tok-two", 1, "alice"),
        ("SUPPORT_TOKENS", "alice:sup-tok-one bob:sup-tok-two", 1, "alice"),
        ("SUPPORT_TOKENS", "alice:sup tok", 1, "alice"),
        # the line break before the first colon: what reads as the actor holds a token, never shown
        ("SERVICE_TOKENS", "svc-tok-one\nbilling:svc-tok-two", 1, None),
        ("SUPPORT_TOKENS", "alice:sup-tok-zero,sup-tok-one\nbob:sup-tok-two", 2, None),
    ],
)
def test_a_token_holding_whitespace_is_refused_naming_the_entry_not_the_token_nor_its_actor(name, value, entry, actor):
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"DATABASE_URL": DB, name: value})
    message = str(err.value)
    assert name in message and f"entry {entry}" in message and (actor is None or actor not in message)
    assert "comma" in message
    assert "tok-one" not in message and "tok-two" not in message and "sup tok" not in message


def test_whitespace_around_entries_and_names_is_still_fine():
    assert parse_service_tokens(" billing : tok-1 ,\n tok-2 \n") == {"tok-1": "billing", "tok-2": "service"}
    assert parse_support_tokens("alice:tok-a,\n  bob smith : tok-b\n") == {"tok-a": "alice", "tok-b": "bob smith"}
