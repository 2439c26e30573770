"""The `dunning` command at its edges (real subprocesses): a malformed setting, a busy account, an
unreadable file is one `error:` line naming the problem and a non-zero status, never a traceback,
and never a secret."""

from __future__ import annotations

import pytest

from tests.integration.test_cli_recompute import dunning

PASSWORD = "s3cr3t-pw"


def test_a_database_url_without_a_scheme_is_an_error_that_does_not_print_the_password():
    """A mistyped URL (its ':' dropped) is refused by name; the message never holds the value."""
    done = dunning("db", "upgrade", database_url=f"postgresql//dunning:{PASSWORD}@db.internal/dunning")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: DATABASE_URL must be a PostgreSQL URL"), done.stderr
    assert PASSWORD not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(("url", "reason"), [
    ("postgresql://postgres@127.0.0.1:99999999999999999999/x", "port must be a number from 1 to 65535"),
    ("postgresql://postgres@127.0.0.1:-1/x", "port must be a number from 1 to 65535"),
    ("postgresql://postgres@127.0.0.1/x?sslmode=bogus", "sslmode must be one of"),
    ("postgresql://postgres@127.0.0.1/x?connect_timeot=3", "an option PostgreSQL does not know: 'connect_timeot'"),
    # not checked by Settings: libpq's own reason when it connects
    ("postgresql://postgres@127.0.0.1/x?target_session_attrs=foo",
     'DATABASE_URL cannot be used: invalid target_session_attrs value: "foo"'),
])
def test_a_port_or_option_libpq_refuses_is_an_error_naming_it_not_a_traceback(url, reason):
    """libpq refused these only when it connected: psycopg2's exception went through as a traceback."""
    done = dunning("recompute", "acct_x", database_url=url)
    assert done.returncode == 2, done.stderr[-400:]
    assert done.stderr.startswith("error: DATABASE_URL") and reason in done.stderr, done.stderr[-400:]
