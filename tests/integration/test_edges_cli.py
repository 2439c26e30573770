"""The `dunning` command at its edges (real subprocesses): a malformed setting, a busy account, an
unreadable file is one `error:` line naming the problem and a non-zero status, never a traceback,
and never a secret."""

from __future__ import annotations

from tests.integration.test_cli_recompute import dunning

PASSWORD = "s3cr3t-pw"


def test_a_database_url_without_a_scheme_is_an_error_that_does_not_print_the_password():
    """A mistyped URL (its ':' dropped) is refused by name; the message never holds the value."""
    done = dunning("db", "upgrade", database_url=f"postgresql//dunning:{PASSWORD}@db.internal/dunning")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: DATABASE_URL must be a PostgreSQL URL"), done.stderr
    assert PASSWORD not in done.stderr and "Traceback" not in done.stderr
