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


def test_a_session_lock_whose_release_fails_is_let_go_with_its_session(database_url, engine):
    """The connection broke inside the block: the lock goes with the session, not back to the pool
    on a connection still holding it, and the block's own error is the one raised."""
    from app.db import session_lock

    locking = make_engine(database_url, pool_size=1, max_overflow=0)
    try:
        try:
            with session_lock(locking, "test-lock") as got:
                assert got
                with engine.connect() as other:  # the server ends the lock holder's session
                    other.exec_driver_sql(
                        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                        "WHERE l.locktype = 'advisory' AND d.datname = current_database() "
                        "AND l.pid <> pg_backend_pid()")
                raise LookupError("the block's own failure")
        except LookupError:
            pass
        with session_lock(locking, "test-lock") as again:
            assert again
    finally:
        locking.dispose()


class Interrupted(BaseException):
    """What a gevent timeout or Ctrl-C raises: not an Exception."""


def test_a_session_lock_interrupted_while_released_does_not_go_back_to_the_pool(database_url, engine):
    """A timeout or an interrupt during the release: SQLAlchemy invalidates a connection a
    BaseException went through, so the lock goes with the session, not back to the pool."""
    from sqlalchemy import event

    from app.db import session_lock

    locking = make_engine(database_url, pool_size=1, max_overflow=0)

    def interrupt_the_unlock(conn, cursor, statement, *args):
        if "pg_advisory_unlock" in statement:
            raise Interrupted()

    try:
        event.listen(locking, "before_cursor_execute", interrupt_the_unlock)
        try:
            with session_lock(locking, "test-interrupted") as got:
                assert got
        except Interrupted:
            pass
        event.remove(locking, "before_cursor_execute", interrupt_the_unlock)
        with session_lock(engine, "test-interrupted") as elsewhere:  # another session: released?
            assert elsewhere
    finally:
        locking.dispose()
