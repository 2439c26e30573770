"""The outbox relay: domain events to Account Management, at least once, in order per account.

Per account, undelivered rows go strictly in id order (ids follow dunning versions) and delivery
stops at the first one that fails, so Account Management never sees version N+1 before N. Only one
relay works on an account at a time (a session advisory lock, tried without waiting: another
relay simply takes other accounts), and one beat pass runs at a time (``pass_lock``), relaying
``PASS_CONCURRENCY`` accounts at once (threads of its one worker process). A pass cut (its task's
soft time limit) cuts its threads' calls and waits for them to give back their locks and database
connections before it ends (``_run_threads``). A failed row
waits ``next_attempt_at`` (backoff with jitter, or the Retry-After asked); no Celery countdown holds
it, and no call outlasts its timeouts (``_call_limit``; its host's name resolution waits at most the
connect timeout, ``_Resolver``). Recompute only writes rows, so Account
Management being down, slow or failing never slows it: the backlog grows and drains when it returns.

A lifecycle request (cancellation, upgrade revert) is checked against the account's state read right
before it is sent: one no longer requested, or a cancellation from a bad-debt episode that has ended,
is marked superseded instead (the reason stays on the row), as is an upgrade revert of a subscription
whose cancellation Account Management has taken (``_after_cancellation``). So is an EntitlementsChanged
whose account's next call is a newer one, and a blocked one (below) once a newer one of the account
waits: entitlements are sent whole, the newer one says it all, and a backlog ends in one call with the
newest. A
lifecycle request of an account paying its bad debt right now waits (``_held_now``) until the payment's
outcome: the recompute that takes it away runs after the charge has begun. So does one of an account
whose recompute is still to run (a webhook stored, an invoice paid on the hosted page, not computed
yet), until that recompute has run, for at most an hour after it was asked for.

Only a 2xx is done: anything else, a redirect included (never followed: it would resend a POST as a
bodiless GET), or no answer is a failure. A failure is always recorded (its text made storable,
whatever the reply held), and an account whose delivery raises something unforeseen is set aside
with backoff while the pass goes on with the others: one poison account never starves the rest.

Each row keeps its last answer: the HTTP status (``last_status``, None when there was none) and a
short reason (``last_error``). A row refused as wrong (a 4xx other than 408/409/425/429, or a 409
answered for over LASTING_CONFLICT since the first of its streak: no request under the same key lasts
that long, so the conflict does, app/outbox/answers.py) is blocked from
then on (``blocked_at``, gauge dunning_outbox_blocked) until it is delivered or an operator skips
it (``dunning outbox skip``, app/outbox/operator.py), or, an EntitlementsChanged, superseded by a
newer one at its next try: it is still retried, and holds back its account's later rows meanwhile.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import random
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from functools import cache
from typing import Any

import requests
from celery.exceptions import SoftTimeLimitExceeded
from requests.adapters import HTTPAdapter
from requests.utils import requote_uri
from sqlalchemy import Connection, Engine
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import allowed_gai_family

from app.account_urls import segment
from app.db import session_lock, unit_of_work
from app.outbox.answers import (
    CONFLICT,
    EXCERPT_LIMIT,
    LASTING_CONFLICT,
    LASTING_CONFLICT_NOTE,
    keeps_conflict,
    masked,
    reason,
    refused_as_wrong,
)
from app.stuck_work import resolve_account_task
from tasks.failures import retry_after_seconds

log = logging.getLogger(__name__)

# The task that relays one account (tasks/outbox.py). Its stuck rows (a run given up, or killed) are
# resolved by any later relay of the account that runs through, the beat pass's too: the relay sends
# the account's rows whole, in order, from where they stand, so the failed run has nothing left to do.
DELIVER_TASK = "tasks.deliver_account_outbox"

TIMEOUT = (2.0, 5.0)  # connect, read: a slow Account Management costs a relay seconds, never minutes
BACKOFF_BASE = 2.0
BACKOFF_CAP = 300.0
RETRY_AFTER_CAP = 3600.0  # the most a Retry-After holds a row back: a wrong header never parks it for good
THROTTLED = (429, 503)  # answers whose Retry-After says when to ask again
ERROR_LIMIT = 2000  # characters of last_error kept
# Bytes of an answer's body read, at most: a JSON error whole, with room to spare (its reason is 200
# characters of it); the rest of a longer answer is never read.
ANSWER_READ_LIMIT = 64 * 1024

# The session advisory locks' names (app.db.session_lock: hashtextextended(name, 0)): an account's,
# and one relay pass at a time, fleet-wide (no colon: never an account's key).
ACCOUNT_LOCK_PREFIX = "outbox:"
PASS_LOCK = "outbox-relay"
# Accounts a pass relays at once (threads of the one worker process the pass holds). Each holds one
# database connection through its calls (its account's lock) and a second one for its statements
# between them: with the pass lock's, 9 of the engine's pool of 10 (app.db.make_engine).
PASS_CONCURRENCY = 4
# How long a cut pass (its task's soft time limit, the process told to stop) waits for its threads,
# their calls cut at once, to record them and give back their locks and connections before it ends
# anyway: well within the soft limit's headroom before the hard one (app.config).
CUT_GRACE = 5.0
CUT_ERROR = "Cut: the relay pass ended during the call (its task stopped); no answer taken"
# Accounts a pass lists (its budget ends it sooner when Account Management is slow): 500 were done
# in under 4 s, and the pass then waited for beat's next one with most of its budget left.
PASS_ACCOUNTS = 5000

# An account is ready when its *first* undelivered row may be tried now; rows behind a failed one
# wait for it, whatever their own next_attempt_at says.
READY_ACCOUNTS_SQL = """
SELECT o.account_id FROM outbox o
 WHERE o.delivered_at IS NULL AND o.next_attempt_at <= %(now)s
   AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.account_id = o.account_id AND p.delivered_at IS NULL
                      AND p.id < o.id)
 ORDER BY o.id
 LIMIT %(limit)s
"""

PENDING_SQL = """
SELECT id, dunning_version, event_type, payload, attempts, next_attempt_at, created_at, blocked_at FROM outbox
 WHERE account_id = %(account)s AND delivered_at IS NULL
 ORDER BY id
 LIMIT %(limit)s
"""

# The account's newest EntitlementsChanged still to deliver, if it is later than this row.
NEWER_ENTITLEMENTS_SQL = """
SELECT id, dunning_version FROM outbox
 WHERE account_id = %(account)s AND delivered_at IS NULL AND id > %(id)s AND event_type = 'EntitlementsChanged'
 ORDER BY id DESC
 LIMIT 1
"""

# The account's next undelivered row that makes a call, after this row: an older EntitlementsChanged
# gives way to a newer one only when no lifecycle request comes between them.
NEXT_CALL_SQL = """
SELECT id, dunning_version, event_type FROM outbox
 WHERE account_id = %(account)s AND delivered_at IS NULL AND id > %(id)s
   AND event_type IN ('EntitlementsChanged', 'CancellationRequested', 'UpgradeRevertRequested')
 ORDER BY id
 LIMIT 1
"""

# %(counted)s: the attempt was counted before the call went (a lifecycle request, SENDING_SQL).
DELIVERED_SQL = """
UPDATE outbox SET delivered_at = %(now)s, attempts = attempts + CASE WHEN %(counted)s THEN 0 ELSE 1 END,
       last_error = NULL, last_status = %(status)s, state = 'delivered'
 WHERE id = %(id)s AND delivered_at IS NULL
"""

# A lifecycle request is counted as sent, and committed, before it goes: a worker that dies (killed,
# its node lost) or a database that fails once Account Management has it leaves the row reading as
# sent without an answer, so that superseded later (the customer paid) it says Account Management
# may have acted on it, as after a timeout or a 5xx, instead of 'no longer requested' alone.
SENDING_SQL = """
UPDATE outbox SET attempts = attempts + 1,
       last_error = left('sent at ' || %(now)s
                         || ', no answer recorded (none yet, or the relay stopped during the call)'
                         || CASE WHEN last_error IS NULL THEN '' ELSE '; the answer before: ' || last_error END,
                         %(limit)s)
 WHERE id = %(id)s AND delivered_at IS NULL
"""

# A lifecycle request sent before without a 2xx or a refusal (no answer, a 5xx) may have been acted on
# by Account Management: its reason says so, with the last answer it had, and the relay warns.
SUPERSEDED_SQL = """
UPDATE outbox SET delivered_at = %(now)s, state = 'superseded',
       last_error = left(%(why)s || CASE WHEN %(lifecycle)s AND attempts > 0 AND blocked_at IS NULL
           THEN ' (sent ' || attempts || ' time(s) before without an answer taken, the last: '
                || coalesce(last_error, 'none') || '; Account Management may have acted on it)'
           ELSE '' END, %(limit)s)
 WHERE id = %(id)s AND delivered_at IS NULL
RETURNING last_error, %(lifecycle)s AND attempts > 0 AND blocked_at IS NULL
"""

# blocked_at stays from the first refusal on: a 503 after a 404 says nothing about the request.
# conflict_since: the first 409 of the current streak, kept through answers that say nothing about the
# request (%(keeps)s); a 409 whose streak began before %(lasting_from)s is a lasting conflict, refused
# as wrong (SET reads the row as it was: the streak's start before this answer). Returns whether it was.
FAILED_SQL = """
UPDATE outbox SET attempts = attempts + CASE WHEN %(counted)s THEN 0 ELSE 1 END, next_attempt_at = %(next)s,
       last_error = CASE WHEN %(conflict)s AND conflict_since < %(lasting_from)s
                         THEN left(%(lasting)s || '; ' || %(error)s, %(limit)s) ELSE %(error)s END,
       last_status = %(status)s,
       blocked_at = CASE WHEN %(refused)s OR (%(conflict)s AND conflict_since < %(lasting_from)s)
                         THEN COALESCE(blocked_at, %(now)s) ELSE blocked_at END,
       conflict_since = CASE WHEN %(conflict)s THEN COALESCE(conflict_since, %(now)s)
                             WHEN %(keeps)s THEN conflict_since END
 WHERE id = %(id)s AND delivered_at IS NULL
RETURNING %(conflict)s AND conflict_since < %(lasting_from)s
"""

# A bad-debt payment in flight: POST /pay-bad-debt commits it before charging the customer, and the
# recompute that lifts the bad debt (and takes the cancellation away) runs after, on a worker. The
# account's own (it pays the account's whole debt), or another account's on an invoice this account
# owns now (another team moved the customer here while it ran) that the request is about: the
# cancelled subscription's invoice, the reverted upgrade. That payment pays none of the account's own
# debt, whose cancellation goes (a bank debit keeps it pending for days). The account's invoices are
# read once (by its customers), the pending payments through their partial index: never the history
# of ended payments.
PAYMENT_IN_FLIGHT_SQL = """
SELECT id FROM bad_debt_payment WHERE account_id = %(account)s AND state = 'pending'
UNION ALL
SELECT b.id FROM bad_debt_payment b
 WHERE b.state = 'pending' AND b.account_id <> %(account)s
   AND b.invoice_ids ?| ARRAY(SELECT i.id FROM subs_customer c JOIN stripe_invoice i USING (stripe_customer_id)
                               WHERE c.account_id = %(account)s
                                 AND (i.subscription_id = %(subscription)s OR i.id = %(invoice)s))
ORDER BY id LIMIT 1
"""

# A row held back (not a failure: no attempt counted, nothing blocked), tried again at %(next)s. One
# sent before keeps the answer it got (once, however often held): superseded later, its reason must
# still say what Account Management answered (SUPERSEDED_SQL), not only that it was held.
HELD_SQL = """
UPDATE outbox SET next_attempt_at = %(next)s,
       last_error = CASE WHEN attempts > 0
           THEN left(%(why)s || '; the last answer before: '
                     || regexp_replace(coalesce(last_error, 'none'), '^held: .*?; the last answer before: ', ''),
                     %(limit)s)
           ELSE %(why)s END
 WHERE id = %(id)s AND delivered_at IS NULL
"""
HOLD_SECONDS = 30.0  # how long a lifecycle request waits for a payment in flight before it looks again

# The account's recompute still to run: a webhook stored (an invoice paid on the hosted page, voided),
# or another request, since the state that asked for the lifecycle request was decided. Not one a dead
# recompute parked (tasks.failures.PARK_REQUEST: nothing runs it until someone asks again), nor one
# pending for over RECOMPUTE_HOLD_LIMIT since it was first asked for (the recompute not keeping up: a
# request is not held back for ever on it; beat's re-drive of a failing recompute gives up within it).
RECOMPUTE_PENDING_SQL = """
SELECT created_at FROM recompute_request
 WHERE account_id = %(account)s AND parked_touch IS DISTINCT FROM touched_at AND created_at > %(since)s
"""
RECOMPUTE_HOLD_LIMIT = timedelta(hours=1)

HEAD_SQL = """
SELECT id, attempts FROM outbox WHERE account_id = %(account)s AND delivered_at IS NULL
 ORDER BY id LIMIT 1 FOR UPDATE
"""


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: dict[str, Any]
    idempotency_key: str


def call_for(row_id: int, account_id: str, version: int, event_type: str, payload: dict[str, Any]) -> Call | None:
    """The Account Management call for one domain event; None for the events that are only
    informational (DunningEntered, PaymentFailed, ConsequenceEscalated...): Account Management acts
    on the entitlements and on cancellation requests, and learns the rest from the entitlements."""
    account = segment(account_id)  # one path segment, '/' and dot segments included
    key = f"outbox-{row_id}"
    if event_type == "EntitlementsChanged":
        return Call("PUT", f"/accounts/{account}/entitlements",
                    {"entitlements": payload.get("entitlements", {}), "dunning_version": version}, key)
    if event_type == "CancellationRequested":
        return Call("POST", f"/accounts/{account}/cancellations",
                    # No dunning_version in a lifecycle request: one request is sent again under its
                    # key from a later version, and the body must be the same for the same key.
                    {"subscription_id": payload.get("subscription_id"), "reason": payload.get("reason"),
                     "action": "cancel"},
                    request_key("cancel", account_id, payload.get("subscription_id"), payload.get("episode"))
                    if payload.get("episode") else key)
    if event_type == "UpgradeRevertRequested":
        # Same lifecycle workflow, but the upgrade is reverted; the subscription is never cancelled.
        return Call("POST", f"/accounts/{account}/cancellations",
                    {"subscription_id": payload.get("subscription_id"), "invoice_id": payload.get("invoice_id"),
                     "action": "revert_upgrade", "reason": "upgrade_unpaid"},
                    request_key("revert", account_id, payload.get("invoice_id")))
    return None


def request_key(kind: str, *parts: Any) -> str:
    """One idempotency key per logical request, not per outbox row: an action taken away (a payment
    in flight holds it) and requested again writes a new row, and Account Management must see the
    same request, not a second cancellation. A cancellation is one per subscription and bad-debt
    episode, a revert one per upgrade invoice."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:32]
    return f"{kind}-{digest}"


# The lifecycle requests, and the action of subs_dunning.actions_requested each one stands for.
ACTIONS = {"CancellationRequested": ("cancel", "subscription_id"), "UpgradeRevertRequested": ("revert", "invoice_id")}
# The same "open episode" as recompute's gather (app/recompute/gather.py): the earliest one not exited.
WANTED_SQL = """
SELECT (SELECT actions_requested FROM subs_dunning WHERE account_id = %(account)s),
       (SELECT min(entered_at) FROM bad_debt_episode WHERE account_id = %(account)s AND exited_at IS NULL)
"""


@dataclass(frozen=True)
class Wanted:
    """What the account's current state asks of the lifecycle workflow: its requested actions, and
    when its open bad-debt episode began (None: none is open)."""
    actions: frozenset[str]
    open_episode: datetime | None


def wanted(engine: Engine, account_id: str) -> Wanted:
    with engine.connect() as conn:
        actions, open_episode = conn.exec_driver_sql(WANTED_SQL, {"account": account_id}).one()
    return Wanted(frozenset(actions or ()), open_episode)


def superseded(event_type: str, payload: dict[str, Any], created_at: datetime, current: Wanted) -> str | None:
    """Why a lifecycle request must not be sent any more, or None. Rows wait while Account
    Management is down; an account that paid its bad debt meanwhile must not be cancelled when it
    comes back. The account's current state decides: the action must still be requested, and a
    cancellation must belong to the open bad-debt episode."""
    kind_ref = ACTIONS.get(event_type)
    if kind_ref is None:
        return None
    action = f"{kind_ref[0]}:{payload.get(kind_ref[1])}"
    if action not in current.actions:
        return f"superseded: {action} is no longer requested"
    if event_type == "CancellationRequested":
        return _not_this_episode(action, payload.get("episode"), created_at, current.open_episode)
    return None


def _superseded_now(engine: Engine, account_id: str, event_type: str, payload: dict[str, Any],
                    created_at: datetime) -> str | None:
    """``superseded`` against the account's state read now, right before this row is sent (for a
    lifecycle request only), not once for the whole backlog: the rows ahead of it may have taken
    up to the pass's budget with a slow Account Management, and a payment meanwhile takes the
    request away."""
    if event_type not in ACTIONS:
        return None
    return superseded(event_type, payload, created_at, wanted(engine, account_id))


def _replaced_by_newer_entitlements(engine: Engine, account_id: str, row_id: int, event_type: str,
                                    blocked: bool) -> str | None:
    """Why an EntitlementsChanged must not be sent, or None. Entitlements are sent whole: a newer
    EntitlementsChanged of the account says everything this one did. One refused as wrong (blocked)
    gives way to any newer one: it would otherwise hold it back until an operator skipped it. One
    not blocked gives way when the newer one is the account's next call: sent, it would put Account
    Management in a state the account has already left (a backlog from an outage: the restriction
    of a customer who has paid since, withholding access until the paid entitlements follow, longer
    if they fail). A lifecycle request between them keeps it: Account Management acts on that
    request with the entitlements of its moment, and it may be refused and hold the newer ones back."""
    if event_type != "EntitlementsChanged":
        return None
    params = {"account": account_id, "id": row_id}
    with engine.connect() as conn:
        if blocked:
            newer = conn.exec_driver_sql(NEWER_ENTITLEMENTS_SQL, params).first()
        else:
            upcoming = conn.exec_driver_sql(NEXT_CALL_SQL, params).first()
            newer = upcoming if upcoming is not None and upcoming[2] == "EntitlementsChanged" else None
    if newer is None:
        return None
    newest = f"the entitlements of version {newer[1]} (outbox {newer[0]})"
    if blocked:
        return f"superseded: refused as wrong, and {newest} replace it"
    return f"superseded: {newest} are next and replace it"


# The account's latest cancellation of a subscription that Account Management took (a 2xx), read from
# the partial index of delivered cancellations (ix_outbox_cancellations_delivered): no other history.
CANCELLATION_DELIVERED_SQL = """
SELECT id, delivered_at FROM outbox
 WHERE account_id = %(account)s AND event_type = 'CancellationRequested' AND state = 'delivered'
   AND payload->>'subscription_id' = %(subscription)s
 ORDER BY id DESC
 LIMIT 1
"""


def _after_cancellation(engine: Engine, account_id: str, event_type: str, payload: dict[str, Any]) -> str | None:
    """Why an upgrade's revert must not be sent, or None: Account Management has taken a cancellation
    of its subscription. compute never asks for both at once (the cancellation supersedes the
    revert: upgrade.revert_superseded), but the account asks for the revert again when its bad debt
    ends otherwise (an invoice voided) while the upgrade is still unpaid and the mirror still shows
    the subscription active (Stripe's subscription.deleted comes once the workflow has cancelled it).
    A revert of a subscription being cancelled is meaningless, and Account Management may refuse it,
    blocking the account's later rows. Superseded, not held: nothing undoes a delivered cancellation.
    History retention keeps the delivered cancellations whatever their age (app/history/prune.py)."""
    subscription = payload.get("subscription_id")
    if event_type != "UpgradeRevertRequested" or not subscription:
        return None
    with engine.connect() as conn:
        cancelled = conn.exec_driver_sql(CANCELLATION_DELIVERED_SQL, {
            "account": account_id, "subscription": str(subscription)}).first()
    if cancelled is None:
        return None
    return (f"superseded: revert:{payload.get('invoice_id')} follows the cancellation of {subscription} "
            f"delivered at {cancelled[1].isoformat()} (outbox {cancelled[0]}): the subscription is being "
            f"cancelled, no upgrade of it is reverted")


def _held_now(engine: Engine, account_id: str, event_type: str, payload: dict[str, Any],
              now: datetime | None = None) -> str | None:
    """Why a lifecycle request must wait, or None: the customer is paying the bad debt right now. The
    payment is committed before the charge and the recompute that lifts the bad debt comes after it,
    so for that while the account's state still asks for the request; sent, a cancellation cancels a
    customer who is paying (DESIGN 6: no bad-debt consequence over a payment in flight), and an
    upgrade's revert takes away what the payment covers (its invoice is among the debt's; compute
    holds the revert too, guard.revert_held). Held, not superseded: if the payment fails before the
    recompute runs, no new request is written, and this one must still go. Or the account's recompute
    is still to run (RECOMPUTE_PENDING_SQL): what it has not seen yet may take the request away."""
    if event_type not in ACTIONS:
        return None
    with engine.connect() as conn:
        payment = conn.exec_driver_sql(PAYMENT_IN_FLIGHT_SQL, {
            "account": account_id, "invoice": payload.get("invoice_id"),
            # A revert names the upgrade's subscription too: only the upgrade invoice is its business.
            "subscription": payload.get("subscription_id") if event_type == "CancellationRequested" else None,
        }).scalar()
        if payment is not None:
            return f"held: bad-debt payment {payment} is in flight"
        # The account's state may no longer ask for it: the webhook of the payment that takes it away
        # is stored and its recompute not run yet (a backlog on the recompute queue, which the relay's
        # own queue does not wait for). Sent now, it cancels a subscription or reverts an upgrade the
        # customer has just paid for; once that recompute has run, the row is sent or superseded.
        pending = conn.exec_driver_sql(RECOMPUTE_PENDING_SQL, {
            "account": account_id, "since": (now or datetime.now(UTC)) - RECOMPUTE_HOLD_LIMIT}).scalar()
    if pending is not None:
        return f"held: a recompute of the account asked for at {pending.isoformat()} has not run yet"
    return None


def _not_this_episode(action: str, episode: Any, created_at: datetime, open_episode: datetime | None) -> str | None:
    """Why a cancellation is not the open episode's, or None. Its idempotency key is one per
    subscription and episode: an ended episode's request, still waiting, would reach Account
    Management beside the open one's under another key, as a second cancellation."""
    if open_episode is None:
        return f"superseded: {action} but no bad-debt episode is open"
    if episode is None:
        # Written before cancellations named their episode: one written before the open episode
        # began belongs to an earlier one.
        if created_at >= open_episode:
            return None
        return f"superseded: {action} was written before the open bad-debt episode ({open_episode.isoformat()})"
    if _instant(episode) == open_episode:
        return None
    return f"superseded: {action} is from bad-debt episode {episode}, not the open one ({open_episode.isoformat()})"


def _instant(text: Any) -> datetime | None:
    """An episode as the event recorded it (its start, ISO 8601); compared as an instant, since the
    same instant may be written with another offset."""
    try:
        return datetime.fromisoformat(str(text))
    except ValueError:
        return None


def storable(text: str, limit: int = ERROR_LIMIT) -> str:
    """``text`` as a text column takes it, at most ``limit`` characters. An error reply's body is
    whatever Account Management (or a proxy before it) sent: psycopg2 refuses a NUL byte and a lone
    surrogate has no UTF-8, and either would lose the record of the failure, so the row would never
    back off. Both are kept visible as escapes."""
    escaped = text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
    return escaped[:limit]


def backoff(attempts: int, rng: random.Random | None = None) -> float:
    """Exponential with jitter: between half and all of base * 2^attempts, capped."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * (2 ** min(attempts, 16)))
    return (rng or random).uniform(ceiling / 2, ceiling)


@dataclass
class RelayReport:
    accounts: int = 0
    delivered: int = 0
    superseded: int = 0
    failed: int = 0
    held: int = 0  # a lifecycle request waiting for a bad-debt payment in flight (its account's rows wait too)
    skipped_locked: int = 0
    throttled: bool = False  # Account Management asked us to wait (Retry-After): the pass ends
    busy: bool = False  # another pass was running: this one left the work to it
    errors: list[str] = field(default_factory=list)
    relayed: list[str] = field(default_factory=list)  # accounts whose rows were gone through without an error
    # Accounts whose run reached their head row without an error and held it (a payment in flight):
    # the rows wait by design. Their relay works: a failure that passes (retrying) is over; a dead
    # row may be the held row's own fault, whose send is not reached while it is held.
    waiting: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"accounts": self.accounts, "delivered": self.delivered, "superseded": self.superseded,
                "failed": self.failed, "held": self.held,
                "skipped_locked": self.skipped_locked, "busy": self.busy}

    def add(self, other: RelayReport) -> None:
        """Count one account's run (a pass relays several at once, each into its own report)."""
        self.accounts += other.accounts
        self.delivered += other.delivered
        self.superseded += other.superseded
        self.failed += other.failed
        self.held += other.held
        self.skipped_locked += other.skipped_locked
        self.throttled = self.throttled or other.throttled
        self.errors.extend(other.errors)
        self.relayed.extend(other.relayed)
        self.waiting.extend(other.waiting)


def account_lock(engine: Engine, account_id: str) -> AbstractContextManager[bool]:
    """Held while the account's rows are sent (or skipped). app.db.session_lock: a lock that may be
    held when its taking or its release is interrupted (the task's soft time limit) goes with its
    connection, never back to the pool, where it kept the account from every other worker."""
    return session_lock(engine, ACCOUNT_LOCK_PREFIX + account_id)


def pass_lock(engine: Engine) -> AbstractContextManager[bool]:
    """Held through a relay pass. Beat sends a pass every few seconds and, with Account Management
    slow, a pass takes its whole budget: passes that ran side by side each held a worker process
    waiting on Account Management, up to budget / interval of them, and filled the pool recomputes
    need. A pass that finds another running leaves the work to it."""
    return session_lock(engine, PASS_LOCK)


@dataclass(frozen=True)
class Failure:
    """A call Account Management did not take: the error to record, how long it asked us to wait
    (a 429's or 503's Retry-After, seconds; None when it said nothing), and its answer's status
    (None: no answer)."""
    error: str
    retry_after: float | None = None
    status: int | None = None

    @property
    def refused(self) -> bool:
        return refused_as_wrong(self.status)


@dataclass(frozen=True)
class Taken:
    """A call Account Management took (2xx)."""
    status: int


def _retry_after(headers: Mapping[str, str], now: datetime) -> float | None:
    """A Retry-After in seconds or as an HTTP date (RFC 9110 allows both), as seconds from ``now``."""
    seconds = retry_after_seconds(headers)
    if seconds is not None:
        return max(seconds, 0.0)
    text = headers.get("Retry-After")
    try:
        when = parsedate_to_datetime(text) if text else None
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max((when - now).total_seconds(), 0.0)


def _wait(attempts: int, failure: Failure) -> float:
    """Seconds before a failed row is tried again: its backoff, or longer if Account Management asked."""
    return max(backoff(attempts), min(failure.retry_after or 0.0, RETRY_AFTER_CAP))


class _CallWatch(threading.local):
    """The connections the current call of this thread sends on (``None``: no call is watched), the
    name resolutions it waits on (each one's wake-up, set when the call is cut) and whether it was."""
    conns: list[HTTPConnection] | None = None
    wakes: list[threading.Event] | None = None
    expired: threading.Event | None = None


_WATCH = _CallWatch()

# How long an address found for Account Management's host (or a proxy's) is used before it is looked
# up again: a relay pass makes many calls, and each would otherwise wait on the resolver once more.
RESOLVE_CACHE = 30.0
RESOLVE_ERROR = "Name resolution"  # how last_error names a host not resolved (no address, or no answer)

_Address = tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]


@dataclass
class _Lookup:
    """One look-up of a host under way, shared by every call waiting for it."""
    done: threading.Event = field(default_factory=threading.Event)
    addresses: Sequence[_Address] = ()
    error: BaseException | None = None
    waiters: set[threading.Event] = field(default_factory=set)


class _Resolver:
    """Host names resolved with a bounded wait. urllib3's connect timeout bounds the TCP connect only:
    the name's resolution before it (socket.getaddrinfo) waits as long as the system's resolver does,
    a DNS server that does not answer holding the relay thread, its account's lock and a database
    connection well beyond the call's limit and a cut pass's grace. Each host is looked up in a thread
    of its own, one at a time (calls meanwhile wait for the same look-up: no thread piles up behind a
    resolver that hangs), and a call waits for it at most its connect timeout, or until it is cut; the
    look-up left running holds nothing of the relay's. Addresses found are kept RESOLVE_CACHE seconds;
    a failure is not kept."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._found: dict[tuple[str, int, int], tuple[float, Sequence[_Address]]] = {}
        self._pending: dict[tuple[str, int, int], _Lookup] = {}

    def forget(self) -> None:
        """Drop the addresses kept (tests)."""
        with self._lock:
            self._found.clear()

    def addresses(self, host: str, port: int, family: int, wait: float) -> Sequence[_Address]:
        """``host``'s addresses; socket.gaierror when it has none, or none came within ``wait`` seconds
        or before the watched call was cut."""
        if _numeric(host):  # no look-up: nothing to wait for
            return socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
        key = (host, port, int(family))
        wake = threading.Event()
        with self._lock:
            found = self._found.get(key)
            if found is not None and found[0] > time.monotonic():
                return found[1]
            lookup = self._pending.get(key)
            if lookup is None:
                lookup = self._pending[key] = _Lookup()
                threading.Thread(target=self._look_up, args=(key, lookup), name="outbox-resolve",
                                 daemon=True).start()
            lookup.waiters.add(wake)
        wakes, expired = _WATCH.wakes, _WATCH.expired
        if wakes is not None:
            wakes.append(wake)
        try:
            if expired is None or not expired.is_set():
                wake.wait(wait)
        finally:
            with self._lock:
                lookup.waiters.discard(wake)
            if wakes is not None:
                with suppress(ValueError):
                    wakes.remove(wake)
        if lookup.done.is_set():
            if lookup.addresses:
                return lookup.addresses
            raise socket.gaierror(f"{lookup.error.__class__.__name__}: {lookup.error}")
        if expired is not None and expired.is_set():
            raise socket.gaierror(f"the call was cut while {host} was being resolved")
        raise socket.gaierror(f"no answer from the resolver for {host} within {wait:g} s")

    def _look_up(self, key: tuple[str, int, int], lookup: _Lookup) -> None:
        host, port, family = key
        addresses: Sequence[_Address] = ()
        error: BaseException | None = None
        try:
            addresses = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
            if not addresses:
                error = OSError("getaddrinfo returns an empty list")
        except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode
            error = exc
        with self._lock:
            if self._pending.get(key) is lookup:
                del self._pending[key]
            if addresses:
                self._found[key] = (time.monotonic() + RESOLVE_CACHE, addresses)
            lookup.addresses, lookup.error = addresses, error
            lookup.done.set()
            for waiter in lookup.waiters:
                waiter.set()


RESOLVER = _Resolver()


def _numeric(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 address may name its zone
    except ValueError:
        return False
    return True


def _new_conn(conn: HTTPConnection) -> socket.socket:
    """urllib3's HTTPConnection._new_conn, its host resolved by ``RESOLVER`` (a bounded wait) and each
    address tried in turn while the call is not cut: the same socket, options and errors."""
    host = conn._dns_host
    if host.startswith("["):
        host = host.strip("[]")
    timeout = conn.timeout
    wait = float(timeout) if isinstance(timeout, int | float) else TIMEOUT[0]
    try:
        addresses = RESOLVER.addresses(host, conn.port, allowed_gai_family(), wait)
    except socket.gaierror as e:
        raise NameResolutionError(conn.host, conn, e) from e
    expired = _WATCH.expired
    error: OSError | None = None
    try:
        for family, kind, proto, _name, address in addresses:
            if expired is not None and expired.is_set():
                break  # cut: the call is over
            sock = None
            try:
                sock = socket.socket(family, kind, proto)
                for option in conn.socket_options or ():
                    sock.setsockopt(*option)
                if timeout is None or isinstance(timeout, int | float):
                    sock.settimeout(timeout)
                if conn.source_address:
                    sock.bind(conn.source_address)
                sock.connect(address)
            except OSError as exc:
                error = exc
                if sock is not None:
                    sock.close()
                continue
            sys.audit("http.client.connect", conn, conn.host, conn.port)
            return sock
        raise error or OSError("the call was cut before it connected")
    except TimeoutError as e:
        raise ConnectTimeoutError(
            conn, f"Connection to {conn.host} timed out. (connect timeout={conn.timeout})") from e
    except OSError as e:
        raise NewConnectionError(conn, f"Failed to establish a new connection: {e}") from e


class _WatchedHTTPConnection(HTTPConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        if _WATCH.conns is not None:
            _WATCH.conns.append(self)
        super().request(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        return _new_conn(self)


class _WatchedHTTPSConnection(HTTPSConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        if _WATCH.conns is not None:
            _WATCH.conns.append(self)
        super().request(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        return _new_conn(self)


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_WATCHED_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class CallLimitAdapter(HTTPAdapter):
    """requests' adapter with connections ``_call_limit`` can cut. urllib3's timeouts bound each read
    of the socket, not the call: an answer that trickles in (a proxy sending a byte every few
    seconds) kept the relay waiting for hours, the same account first in line at every pass."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _WATCHED_POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _WATCHED_POOLS
        return manager


def _watched(session: requests.Session) -> None:
    """Mount ``CallLimitAdapter`` on ``session`` (once). Not looked up by Account Management's URL:
    one without a scheme is refused by the call itself, recorded as that row's failure."""
    if not isinstance(session.adapters.get("http://"), CallLimitAdapter):
        adapter = CallLimitAdapter()
        session.mount("http://", adapter)
        session.mount("https://", adapter)


class PassCut:
    """Set once a relay pass is cut: the calls its threads have under way are cut at once (their
    ``_call_limit`` reached), and so is one begun after."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = False
        self._calls: set[threading.Event] = set()  # each call's watchdog's wake-up

    def set(self) -> None:
        with self._lock:
            self._set = True
            calls = list(self._calls)
        for wake in calls:
            wake.set()

    def is_set(self) -> bool:
        return self._set

    @contextmanager
    def watching(self, wake: threading.Event) -> Iterator[None]:
        with self._lock:
            self._calls.add(wake)
            if self._set:
                wake.set()
        try:
            yield
        finally:
            with self._lock:
                self._calls.discard(wake)


@contextmanager
def _call_limit(seconds: float, pass_cut: PassCut | None = None) -> Iterator[threading.Event]:
    """Cut the connections the call in the block sends on once it has taken ``seconds``, or once
    ``pass_cut`` is set: its socket is shut, so the read waiting on it ends. The event says whether
    it was cut: whatever answer the call then returns is incomplete (a 200 cut in its headers looks
    whole)."""
    conns: list[HTTPConnection] = []
    resolving: list[threading.Event] = []
    done, expired, wake = threading.Event(), threading.Event(), threading.Event()

    def cut() -> None:
        wake.wait(seconds)  # set when the call is done, or its pass cut
        if done.is_set():
            return
        expired.set()
        while not done.is_set():  # again until the call gives up: its connect may be under way
            for resolution in list(resolving):
                resolution.set()  # its host's resolution is waited for no more
            for conn in list(conns):
                sock = getattr(conn, "sock", None)
                if sock is not None:
                    with suppress(OSError):  # already closed
                        sock.shutdown(socket.SHUT_RDWR)
            done.wait(0.1)

    watchdog = threading.Thread(target=cut, name="outbox-call-limit", daemon=True)
    _WATCH.conns, _WATCH.wakes, _WATCH.expired = conns, resolving, expired
    watchdog.start()
    try:
        with pass_cut.watching(wake) if pass_cut is not None else nullcontext():
            yield expired
    finally:
        _WATCH.conns, _WATCH.wakes, _WATCH.expired = None, None, None
        done.set()
        wake.set()
        watchdog.join()


def _body_start(response: requests.Response) -> bytes:
    """At most ``ANSWER_READ_LIMIT`` bytes of the answer's body, decompressed: all a refusal's reason
    reads (a 2xx's body is not read for anything). Read whole, an answer (a proxy's page, an echo,
    a small gzip inflating to gigabytes) was held in the worker's memory however large it was."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(16 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size > ANSWER_READ_LIMIT:
            break  # the rest is never read: the connection is closed, not reused
    return b"".join(chunks)[:ANSWER_READ_LIMIT]


def _text(body: bytes, encoding: str | None) -> str:
    """The body as text, in the charset its answer names (UTF-8 when it names none, or one unknown)."""
    try:
        return str(body, encoding or "utf-8", errors="replace")
    except LookupError:
        return str(body, "utf-8", errors="replace")


def _request(session: requests.Session, call: Call, base_url: str,
             timeout: tuple[float, float]) -> requests.Response:
    """``session.request``, with the call's path sent as it was encoded: requests decodes every
    %-escape of an unreserved character (requote_uri), so an account "..", sent as %2E%2E, would go
    out as a ".." segment that Account Management (or a proxy before it) resolves to another path."""
    prepared = session.prepare_request(requests.Request(call.method, base_url.rstrip("/") + call.path,
                                                        json=call.body,
                                                        headers={"Idempotency-Key": call.idempotency_key}))
    assert prepared.url is not None
    requoted = requote_uri(call.path)
    if requoted != call.path and prepared.url.endswith(requoted):
        prepared.url = prepared.url[:-len(requoted)] + call.path
    settings = session.merge_environment_settings(prepared.url, {}, True, None, None)
    # Redirects are not followed: requests would turn a 301/302 POST into a GET without its
    # body, and that GET's 200 would mark a cancellation delivered that nobody received.
    return session.send(prepared, timeout=timeout, allow_redirects=False, **settings)


def _unresolved(exc: BaseException) -> str | None:
    """Why the host of a call that failed was not resolved (urllib3's NameResolutionError, under
    requests' ConnectionError and urllib3's MaxRetryError), or None when that is not why it failed."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, NameResolutionError):
            return str(e._reason)
        todo.extend([e.__cause__, e.__context__, getattr(e, "reason", None)])
        todo.extend(a for a in e.args if isinstance(a, BaseException))
    return None


def _send(session: requests.Session, base_url: str, call: Call, timeout: tuple[float, float],
          now: datetime, pass_cut: PassCut | None = None) -> Taken | Failure:
    """Taken when Account Management took it (2xx), else the failure to record. The whole call, its
    answer read in full, takes at most the connect and read timeouts together, and ends at once when
    ``pass_cut`` is set."""
    limit = sum(timeout)
    _watched(session)

    def incomplete() -> Failure:
        if pass_cut is not None and pass_cut.is_set():
            return Failure(CUT_ERROR)
        return Failure(f"Timeout: no complete answer from Account Management within {limit:g} s")

    with _call_limit(limit, pass_cut) as expired:
        try:
            response = _request(session, call, base_url, timeout)
            try:
                body = _body_start(response)
            finally:
                response.close()  # a body read to its end keeps the connection for the next call
        except requests.RequestException as exc:
            if expired.is_set():
                return incomplete()
            unresolved = _unresolved(exc)
            if unresolved is not None:
                return Failure(f"{RESOLVE_ERROR}: {storable(masked(unresolved), EXCERPT_LIMIT)}: "
                               f"no answer from Account Management")
            return Failure(f"{exc.__class__.__name__}: no answer from Account Management")
    if expired.is_set():
        return incomplete()
    status = response.status_code
    if 200 <= status < 300:
        return Taken(status)
    if response.is_redirect or response.is_permanent_redirect:
        # A failure like any other non-2xx, retried with backoff; the Location is on the row (and
        # in the log) because it means ACCOUNT_MANAGEMENT_URL points at the wrong place.
        location = storable(masked(response.headers.get("Location", "")), 500)
        return Failure(f"HTTP {status}: redirected to {location!r}, not followed "
                       f"(check ACCOUNT_MANAGEMENT_URL)", status=status)
    said = reason(_text(body, response.encoding)) or masked(str(response.reason or ""))  # empty: the status line's
    error = f"HTTP {status}: {storable(said, EXCERPT_LIMIT)}"
    if status in THROTTLED:
        return Failure(error, _retry_after(response.headers, now), status)
    return Failure(error, status=status)


def deliver_account(engine: Engine, session: requests.Session, base_url: str, account_id: str,
                    now_fn: Callable[[], datetime] | None = None, max_rows: int = 200,
                    report: RelayReport | None = None, timeout: tuple[float, float] = TIMEOUT,
                    deadline: float | None = None, resolve_stuck: bool = True,
                    stop: Callable[[], bool] | None = None, pass_cut: PassCut | None = None) -> RelayReport:
    """Deliver one account's rows in order, until one fails or ``deadline`` (time.monotonic) passes:
    a slow Account Management must not pin the task for minutes on one account's backlog. A run that
    goes through the account's rows without an error, up to the end or to a row Account Management
    did not take (that row keeps its own failure and backoff), resolves the account's stuck relay
    work (``DELIVER_TASK``); with ``resolve_stuck`` false the caller does it (the beat pass: once for
    all its accounts); ``stop`` true ends it too, before its next row (the pass was throttled), and
    ``pass_cut`` set ends its call under way at once too (the pass was cut)."""
    now_fn = now_fn or (lambda: datetime.now(UTC))
    report = report or RelayReport()
    with account_lock(engine, account_id) as got:
        if not got:
            report.skipped_locked += 1
            return report
        report.accounts += 1
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(PENDING_SQL, {"account": account_id, "limit": max_rows}).fetchall()
        # Cut short before the account's rows were gone through (a head row backing off or held, the
        # deadline): the row a failed run broke on may be one not reached, so its stuck work stays.
        cut = False
        for row_id, version, event_type, payload, attempts, next_attempt_at, created_at, blocked_at in rows:
            now = now_fn()
            if next_attempt_at > now:
                cut = True
                break  # the head of the line is backing off: so is everything behind it
            if ((deadline is not None and time.monotonic() > deadline) or (stop is not None and stop())
                    or (pass_cut is not None and pass_cut.is_set())):
                cut = True
                break  # the rest waits for the next pass, still in order
            skip = (_replaced_by_newer_entitlements(engine, account_id, row_id, event_type, blocked_at is not None)
                    or _superseded_now(engine, account_id, event_type, payload or {}, created_at)
                    or _after_cancellation(engine, account_id, event_type, payload or {}))
            held = None if skip else _held_now(engine, account_id, event_type, payload or {}, now)
            if held:
                with unit_of_work(engine) as conn:
                    conn.exec_driver_sql(HELD_SQL, {"id": row_id, "why": held, "limit": ERROR_LIMIT,
                                                    "next": now + timedelta(seconds=HOLD_SECONDS)})
                log.info("outbox %s (%s v%s) for %s waits: %s", row_id, event_type, version, account_id, held)
                report.held += 1
                report.waiting.append(account_id)
                cut = True
                break  # the rows behind it wait, in order
            call = None if skip else call_for(row_id, account_id, version, event_type, payload or {})
            counted = call is not None and event_type in ACTIONS
            if counted:
                with unit_of_work(engine) as conn:
                    conn.exec_driver_sql(SENDING_SQL, {"id": row_id, "now": now.isoformat(), "limit": ERROR_LIMIT})
            answer = _send(session, base_url, call, timeout, now, pass_cut) if call is not None else None
            failure = answer if isinstance(answer, Failure) else None
            lasting = False  # a 409 that lasts: blocked
            with unit_of_work(engine) as conn:
                if skip:
                    # Done with, not sent: the reason stays on the row (GET /ops/outbox shows it).
                    done = conn.exec_driver_sql(SUPERSEDED_SQL, {
                        "id": row_id, "now": now_fn(), "why": storable(skip), "lifecycle": event_type in ACTIONS,
                        "limit": ERROR_LIMIT}).first()
                    maybe_sent = done is not None and done[1]
                    log.log(logging.WARNING if maybe_sent else logging.INFO, "outbox %s (%s v%s) for %s not sent: %s",
                            row_id, event_type, version, account_id, done[0] if done is not None else skip)
                elif failure is None:
                    conn.exec_driver_sql(DELIVERED_SQL, {"id": row_id, "now": now_fn(), "counted": counted,
                                                         "status": answer.status if answer else None})
                else:
                    lasting = _record_failure(conn, row_id, attempts, failure, now_fn(), counted)
            if failure is not None:
                report.failed += 1
                report.errors.append(failure.error)
                # Account Management said when to ask again: the rest of the pass does not ask it
                # sooner for other accounts either (a 429 limits the relay, not one account).
                report.throttled = report.throttled or bool(failure.retry_after)
                log.warning("outbox %s (%s v%s) for %s not delivered%s: %s", row_id, event_type, version,
                            account_id, BLOCKED_NOTE if failure.refused or lasting else "",
                            f"{LASTING_CONFLICT_NOTE}; {failure.error}" if lasting else failure.error)
                break  # never deliver a later version before this one
            if skip:
                report.superseded += 1
            else:
                report.delivered += 1
        if not cut:
            report.relayed.append(account_id)
    if resolve_stuck and not cut:
        resolve_account_task(engine, DELIVER_TASK, [account_id])
    elif resolve_stuck and account_id in report.waiting:
        resolve_account_task(engine, DELIVER_TASK, [account_id], retrying_only=True)
    return report


BLOCKED_NOTE = (" and blocked (refused as wrong: the account's later rows wait; `dunning outbox list --blocked`, "
                "`dunning outbox skip`)")


def _record_failure(conn: Connection, row_id: int, attempts: int, failure: Failure, now: datetime,
                    counted: bool = False) -> bool:
    """The row's last answer, and when it is tried again: its backoff, or what Account Management asked.
    ``attempts``: the row's before this try; ``counted``: this try was counted before it went. True
    when the answer is a 409 that has lasted (LASTING_CONFLICT): the row is blocked."""
    lasting = conn.exec_driver_sql(FAILED_SQL, {
        "id": row_id, "next": now + timedelta(seconds=_wait(attempts, failure)),
        "error": storable(failure.error), "status": failure.status, "refused": failure.refused, "now": now,
        "counted": counted, "conflict": failure.status == CONFLICT, "keeps": keeps_conflict(failure.status),
        "lasting_from": now - LASTING_CONFLICT, "lasting": LASTING_CONFLICT_NOTE, "limit": ERROR_LIMIT}).scalar()
    return bool(lasting)


def set_aside(engine: Engine, account_id: str, exc: Exception, now_fn: Callable[[], datetime],
              report: RelayReport) -> None:
    """Record ``exc`` on the account's first undelivered row and back it off, as a failed delivery:
    the account is not ready again until then. If this fails too, the database itself is failing
    and the error goes up (the task retries by failure class)."""
    error = storable(f"relay error: {exc.__class__.__name__}: {exc}")
    report.failed += 1
    report.errors.append(error)
    with account_lock(engine, account_id) as got:
        if not got:
            return  # another relay works on it now
        with unit_of_work(engine) as conn:
            head = conn.exec_driver_sql(HEAD_SQL, {"account": account_id}).first()
            if head is not None:
                _record_failure(conn, head[0], head[1], Failure(error), now_fn())


@cache
def _warn_not_relayed() -> None:
    """Once per process: beat runs the relay every few seconds, and the backlog stays visible in
    the task's result, the backlog gauge and GET /ops/outbox."""
    log.warning("ACCOUNT_MANAGEMENT_URL is not set: the outbox is not relayed (the backlog grows until it is)")


def relay(engine: Engine, base_url: str | None, now: datetime | None = None, budget_seconds: float = 20.0,
          limit: int = PASS_ACCOUNTS, session: requests.Session | None = None,
          timeout: tuple[float, float] = TIMEOUT, concurrency: int = PASS_CONCURRENCY) -> RelayReport:
    """One pass over the accounts whose next row is ready, within a time budget (beat comes again),
    ``concurrency`` accounts at a time. ``now`` fixes the clock of the pass (tests); by default it is
    the wall clock."""
    clock: Callable[[], datetime] = (lambda: now) if now is not None else (lambda: datetime.now(UTC))
    report = RelayReport()
    if not base_url:
        _warn_not_relayed()
        return report
    with pass_lock(engine) as got:
        if not got:
            report.busy = True
            return report
        _relay_pass(engine, base_url, clock, budget_seconds, limit, session, timeout, report, concurrency)
    return report


def _run_threads(count: int, run: Callable[[], None], pass_cut: PassCut) -> None:
    """``run`` in ``count`` threads, until each is done; what ended one (a database failing, the process
    told to exit) then ends the pass. A pass cut while it waits (in the main thread: the task's soft
    time limit is a signal, or the process told to stop) sets ``pass_cut``: its threads' calls are cut
    (their rows record it and back off; sent again, the same request under the same key) and they take
    no further row. It waits for them, up to CUT_GRACE, to give back what they hold: on their own they
    went on with their calls and their accounts' locks (a connection each, a second to record the
    answer) into the worker process's next tasks, a next pass among them needing 9 of its pool's 10."""
    errors: list[BaseException] = []
    # Set as each thread ends, whatever ended it. Waited on rather than the threads joined: a join
    # that a signal handler's exception interrupts marks its thread stopped while it still runs
    # (threading's bpo-45274 handling, Python 3.11), and a second join of it returned at once while
    # the thread still held its connections (seen in the test about 1 run in 8).
    ended = [threading.Event() for _ in range(count)]

    def thread(end: threading.Event) -> None:
        try:
            run()
        except BaseException as exc:
            errors.append(exc)
        finally:
            end.set()

    threads = [threading.Thread(target=thread, args=(end,), name=f"outbox-relay_{n}", daemon=True)
               for n, end in enumerate(ended)]
    try:
        for t in threads:
            t.start()
        for end in ended:
            end.wait()
    except BaseException:
        pass_cut.set()
        grace_end = time.monotonic() + CUT_GRACE
        for t, end in zip(threads, ended, strict=True):
            if t.ident is not None:  # started
                end.wait(max(grace_end - time.monotonic(), 0.0))
                t.join(max(grace_end - time.monotonic(), 0.0))
        raise
    for t in threads:
        t.join()  # ended: about to exit
    if errors:
        raise errors[0]


def _relay_pass(engine: Engine, base_url: str, clock: Callable[[], datetime], budget_seconds: float, limit: int,
                session: requests.Session | None, timeout: tuple[float, float], report: RelayReport,
                concurrency: int = PASS_CONCURRENCY) -> None:
    with engine.connect() as conn:
        accounts = [r[0] for r in conn.exec_driver_sql(READY_ACCOUNTS_SQL, {"now": clock(), "limit": limit})]
    deadline = time.monotonic() + budget_seconds
    ready = iter(accounts)
    taking = threading.Lock()
    pass_cut = PassCut()

    def next_account() -> str | None:
        with taking:
            if time.monotonic() > deadline or report.throttled or pass_cut.is_set():
                return None
            return next(ready, None)

    def relay_accounts(session: requests.Session) -> None:
        while (account_id := next_account()) is not None:
            own = RelayReport()
            try:
                # Throttled (a Retry-After) by another account's call: this account's next rows wait
                # too. Calls already under way when it came are answered as they come.
                deliver_account(engine, session, base_url, account_id, now_fn=clock, report=own,
                                timeout=timeout, deadline=deadline, resolve_stuck=False,
                                stop=lambda: report.throttled, pass_cut=pass_cut)
            except SoftTimeLimitExceeded:
                raise  # the task's own time is up: not this account's fault
            except Exception as exc:
                # Unforeseen, for this account only. Without setting it aside the next pass would
                # take it first again and fail again, and no other account would ever be delivered.
                log.exception("outbox relay failed on account %s: set aside, the pass goes on", account_id)
                set_aside(engine, account_id, exc, clock, own)
            finally:
                with taking:
                    report.add(own)

    def with_session(run: Callable[[requests.Session], None]) -> None:
        if session is not None:
            run(session)
        else:
            with requests.Session() as own_session:
                run(own_session)

    workers = min(concurrency, len(accounts))
    if workers <= 1:
        with_session(relay_accounts)
    else:
        # Accounts at once, each account's rows in order under its own lock: the drain goes at
        # Account Management's pace, not at one call's round trip plus the account's statements.
        _run_threads(workers, lambda: with_session(relay_accounts), pass_cut)
    resolve_account_task(engine, DELIVER_TASK, report.relayed)
    resolve_account_task(engine, DELIVER_TASK, report.waiting, retrying_only=True)
