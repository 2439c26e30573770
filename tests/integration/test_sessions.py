"""What every database session of the product is set up with (app/db.py make_engine)."""

from __future__ import annotations

from app.db import make_engine


def test_a_session_fails_stuck_work_and_lets_a_dead_host_go(database_url):
    engine = make_engine(database_url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            row = conn.exec_driver_sql(
                "SELECT current_setting('statement_timeout'), current_setting('lock_timeout'), "
                "current_setting('TimeZone'), inet_client_addr() IS NULL, "
                "current_setting('tcp_keepalives_idle'), current_setting('tcp_keepalives_interval'), "
                "current_setting('tcp_keepalives_count')").one()
    finally:
        engine.dispose()
    assert row[:3] == ("10s", "5s", "UTC")
    unix_socket = row[3]
    # Over TCP a host that died holding a session lock is let go within about a minute
    # (PostgreSQL ignores these over a Unix socket, where they read 0).
    assert unix_socket or row[4:] == ("30", "10", "3")
