"""The outbox relay, audited: its advisory locks never stay behind on a pooled connection, an
answer's body is read only as far as the relay needs it, and a lifecycle request sent by a worker
that died before its answer was recorded still counts as sent."""

from __future__ import annotations

import gzip
import logging
import tracemalloc
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import Engine, event

from app.domain.events import EntitlementsChanged
from app.outbox.answers import EXCERPT_LIMIT
from app.outbox.relay import account_lock, pass_lock, relay
from tests.conftest import wait_for
from tests.integration.test_outbox_relay import LATER, outbox, requesting, write_events
from tests.integration.test_outbox_stale_entitlements import cancellation_in_bad_debt

LOCKS: dict[str, Callable[[Engine], AbstractContextManager[bool]]] = {
    "account": lambda engine: account_lock(engine, "acct_lock_audit"),
    "pass": pass_lock,
}


def _interrupt(when: str, statement_part: str) -> Callable[..., None]:
    def interrupt(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement_part in statement:
            raise SoftTimeLimitExceeded()
    interrupt.__name__ = f"interrupt_{when}"
    return interrupt


@pytest.mark.parametrize("lock", sorted(LOCKS))
@pytest.mark.parametrize("when, statement_part", [
    # The task's soft time limit lands in the release: the unlock never reached the server.
    ("before_cursor_execute", "pg_advisory_unlock"),
    # It lands right after the server granted the lock, before the relay knew it had it.
    ("after_cursor_execute", "pg_try_advisory_lock"),
])
def test_a_relay_lock_interrupted_is_not_kept_on_a_pooled_connection(locking, engine, lock, when, statement_part):
    """The relay's locks are session locks: a connection given back to the pool still holding one
    (a rollback does not release it) kept the account's rows, or every relay pass of the fleet, from
    every other worker until that worker's connection was recycled (30 min) or the worker stopped:
    another pass found it 'busy' each time and the whole outbox stood still."""
    interrupt = _interrupt(when, statement_part)
    event.listen(locking, when, interrupt)
    try:
        with suppress(SoftTimeLimitExceeded), LOCKS[lock](locking):
            pass
    finally:
        event.remove(locking, when, interrupt)
    # Another worker's session takes it once the interrupted session has ended (closing a connection
    # does not wait for its server process to go).
    wait_for(lambda: _free(LOCKS[lock], engine), message="the lock to be free for another worker")
    with LOCKS[lock](locking) as again:  # and the interrupted worker takes it again too
        assert again


def _free(lock: Callable[[Engine], AbstractContextManager[bool]], engine: Engine) -> bool:
    with lock(engine) as got:
        return got


@pytest.mark.parametrize("status", [200, 422])
def test_an_answers_body_is_read_only_as_far_as_the_relay_needs(accounts, engine, fake_am, status):
    """The whole body of every answer was read into memory, decompressed: a proxy's page, an echo,
    or a small gzip that inflates to gigabytes held that much in the worker (its pod has 1 GiB) for
    every row it answered, and the row came first again at every pass. A 2xx needs no body at all,
    a refusal its first words; what is read is bounded whatever the answer (asserted by the memory
    the pass takes rather than timed: tests time nothing)."""
    account, _ = accounts.create()
    other, _ = accounts.create()
    write_events(engine, account, 1, [EntitlementsChanged(entitlements={"prod_core": "full"})])
    write_events(engine, other, 1, [EntitlementsChanged(entitlements={"prod_core": "full"})])
    inflated = 48 * 1024 * 1024
    fake_am.answer_raw(account, status, gzip.compress(b"x" * inflated), headers={"Content-Encoding": "gzip"})

    tracemalloc.start()
    try:
        report = relay(engine, fake_am.url, now=datetime.now(UTC) + LATER)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"the pass took {peak / 2**20:.0f} MiB"
    (row,) = outbox(engine, account)
    if status == 200:
        assert (report.delivered, report.failed) == (2, 0)
        assert row["state"] == "delivered" and row["last_status"] == 200
    else:
        assert (report.delivered, report.failed) == (1, 1)
        assert row["last_status"] == 422 and row["blocked_at"] is not None
        assert row["last_error"] == "HTTP 422: " + "x" * EXCERPT_LIMIT
    assert [r.body["dunning_version"] for r in fake_am.entitlements(other)] == [1]


class _DiesOnceSent(requests.Session):
    """The worker's process ends (killed for its memory, its node lost, a stop without grace) once
    Account Management has the request, before its answer is recorded."""

    def send(self, *args: Any, **kwargs: Any) -> Any:
        super().send(*args, **kwargs)
        raise SystemExit("the worker was killed")


def test_a_cancellation_sent_by_a_worker_that_died_before_its_answer_says_it_may_have_gone(
        accounts, engine, fake_am, caplog):
    """Account Management cancelled the subscription, but the worker died before the 2xx was
    recorded: the row read as never tried. The customer then paid and the request was superseded as
    'no longer requested', an INFO line: nobody was told to check a subscription cancelled under a
    customer who paid. A lifecycle request is counted as sent before it goes, so its reason and the
    warning say Account Management may have acted on it (as after a timeout or a 5xx)."""
    account, _ = accounts.create()
    cancellation_in_bad_debt(engine, account)
    with pytest.raises(SystemExit), _DiesOnceSent() as session:
        relay(engine, fake_am.url, session=session)
    assert [r.kind for r in fake_am.for_account(account)] == ["cancellations"]  # it went

    requesting(engine, account)  # paid: the cancellation is no longer requested
    with caplog.at_level(logging.INFO, logger="app.outbox.relay"):
        assert relay(engine, fake_am.url).superseded == 1
    (row,) = outbox(engine, account)
    assert row["state"] == "superseded" and "sent 1 time(s) before" in row["last_error"]
    assert "may have acted on it" in row["last_error"]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "may have acted" in r.getMessage()]
    assert len(warned) == 1
    assert len(fake_am.for_account(account)) == 1  # not sent again


def test_a_lifecycle_request_answered_counts_one_attempt(accounts, engine, fake_am):
    """Counted before it goes, a request is not counted again with its answer: one per call."""
    account, _ = accounts.create()
    cancellation_in_bad_debt(engine, account)
    fake_am.mode = "failing"
    assert relay(engine, fake_am.url).failed == 1
    (row,) = outbox(engine, account)
    assert (row["attempts"], row["last_status"]) == (1, 503) and row["last_error"].startswith("HTTP 503")
    fake_am.mode = "up"
    assert relay(engine, fake_am.url, now=datetime.now(UTC) + LATER).delivered == 1
    (row,) = outbox(engine, account)
    assert (row["attempts"], row["state"], row["last_error"]) == (2, "delivered", None)
