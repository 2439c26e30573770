"""A name server that does not answer holds no relay call past its bounds.

urllib3's connect timeout bounds the TCP connect, not the resolution of Account Management's host
before it (socket.getaddrinfo): a DNS server that did not answer held the relay thread, its account's
lock and its database connection as long as the system's resolver waited, past the call's limit
(its connect and read timeouts together) and past a cut pass's grace (CUT_GRACE). Here the resolver
is replaced at the socket.getaddrinfo seam by one that answers only when the test says so.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from urllib.parse import urlsplit

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.pool import QueuePool

from app.db import make_engine
from app.domain.events import EntitlementsChanged
from app.outbox.relay import CUT_ERROR, RESOLVER, account_lock, relay
from tests.integration.test_outbox_relay import outbox, write_events

HOST = "account-management.test"  # a name only the fake resolver knows


class SilentResolver:
    """socket.getaddrinfo, except that HOST is resolved (to the fake Account Management's address)
    only once ``answer`` is set; an unanswered look-up gives up after ``gives_up`` seconds, as the
    system's resolver does after its own timeouts and attempts."""

    def __init__(self, gives_up: float = 10.0) -> None:
        self.real = socket.getaddrinfo
        self.asked = threading.Event()
        self.answer = threading.Event()
        self.gives_up = gives_up
        self.lookups = 0

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != HOST:
            return self.real(host, port, *args, **kwargs)
        self.lookups += 1
        self.asked.set()
        if not self.answer.wait(self.gives_up):
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return self.real("127.0.0.1", port, *args, **kwargs)


@pytest.fixture
def resolver(monkeypatch) -> Iterator[SilentResolver]:
    silent = SilentResolver()
    monkeypatch.setattr(socket, "getaddrinfo", silent)
    RESOLVER.forget()
    try:
        yield silent
    finally:
        silent.answer.set()  # the look-up left running ends
        for t in threading.enumerate():
            if t.name == "outbox-resolve":
                t.join()
        RESOLVER.forget()


def named(url: str) -> str:
    """The fake Account Management's URL with HOST for its address."""
    return url.replace(cast(str, urlsplit(url).hostname), HOST, 1)


def entitlements(level: str) -> EntitlementsChanged:
    return EntitlementsChanged(entitlements={"products": {"prod_core": level}, "plan_changes": False})


def test_a_name_server_that_does_not_answer_ends_the_call_at_its_connect_timeout(
        accounts, engine, fake_am, resolver):
    """The call waits for the host's resolution at most its connect timeout: the row records no answer
    naming the resolution and backs off, unblocked, the account's lock is given back, and all this while
    the look-up is still unanswered. Once the resolver answers, the next pass delivers the same row."""
    account, _ = accounts.create()
    now = datetime.now(UTC)
    write_events(engine, account, 1, [entitlements("read_only")], at=now)
    report = relay(engine, named(fake_am.url), now=now, timeout=(0.2, 1.0))

    assert resolver.asked.is_set() and not resolver.answer.is_set()  # the look-up is still unanswered
    assert (report.delivered, report.failed) == (0, 1)
    (row,) = outbox(engine, account)
    assert (row["state"], row["attempts"], row["last_status"], row["blocked_at"]) == ("pending", 1, None, None)
    assert row["last_error"] == (f"Name resolution: no answer from the resolver for {HOST} within 0.2 s: "
                                 "no answer from Account Management")
    assert row["next_attempt_at"] > now  # backs off
    with account_lock(engine, account) as got:
        assert got  # given back
    assert fake_am.entitlements(account) == []

    resolver.answer.set()
    later = now + timedelta(seconds=10)  # past its backoff (at most 2 s)
    again = relay(engine, named(fake_am.url), now=later, timeout=(0.2, 1.0))
    assert (again.delivered, again.failed) == (1, 0)
    (row,) = outbox(engine, account)
    assert row["state"] == "delivered"
    assert [r.idempotency_key for r in fake_am.entitlements(account)] == [f"outbox-{row['id']}"]
    assert resolver.lookups == 1  # one look-up, its answer kept for the next call


def test_a_pass_cut_while_its_calls_wait_on_the_name_server_gives_back_what_it_holds(
        accounts, engine, settings, fake_am, resolver):
    """Cut by its soft time limit while its threads' calls wait on a resolver that does not answer
    (connect timeout far away), the pass ends with every connection of its pool back and no relay
    thread left, its calls under way recorded as cut, the look-up still unanswered."""
    created = [accounts.create()[0] for _ in range(8)]
    passes = make_engine(settings.database_url)  # a worker process's pool, the passes' own
    main = threading.main_thread().ident
    assert main == threading.get_ident()

    def soft_time_limit(_signum: int, _frame: Any) -> None:
        raise SoftTimeLimitExceeded()  # as billiard's handler in a prefork child

    real = resolver.real

    def asked(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == HOST and not resolver.asked.is_set():
            signal.pthread_kill(main, signal.SIGUSR1)  # time is up while the name server is silent
        return resolver(host, port, *args, **kwargs)

    previous = signal.signal(signal.SIGUSR1, soft_time_limit)
    try:
        socket.getaddrinfo = asked  # the fixture's monkeypatch puts the real one back
        for account in created:
            write_events(engine, account, 1, [entitlements("read_only")])
        with pytest.raises(SoftTimeLimitExceeded):
            relay(passes, named(fake_am.url), timeout=(30.0, 5.0))

        assert resolver.asked.is_set() and not resolver.answer.is_set()
        assert cast(QueuePool, passes.pool).checkedout() == 0
        assert not [t for t in threading.enumerate() if t.name.startswith("outbox-relay") and t.is_alive()]
        cut = 0
        for account in created:
            (row,) = outbox(engine, account)
            assert row["state"] == "pending" and row["blocked_at"] is None
            if row["attempts"]:
                assert (row["attempts"], row["last_error"]) == (1, CUT_ERROR)
                cut += 1
            else:
                assert row["last_error"] is None  # never taken
        assert cut >= 1
        assert [r for a in created for r in fake_am.entitlements(a)] == []
    finally:
        signal.signal(signal.SIGUSR1, previous)
        socket.getaddrinfo = real
        passes.dispose()
