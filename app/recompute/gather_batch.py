"""Gather for many accounts at once, set-based: each table is read once for the whole batch.

``gather_many`` (gather.py) is tuned for one account: one statement with a correlated sub-select
per table, each turned into JSON. For a batch of hundreds that costs ~80 µs per account, most of it
in the per-account sub-selects and the JSON round trip. Here every table is one prepared statement
for the whole batch (``= ANY(ids)`` on an indexed column), rows come back as native columns, and
Python groups them by account into exactly the Snapshot objects ``gather_many`` builds (the same
order inside every tuple; tests/integration/test_gather_batch.py compares them one by one).

Several statements are several MVCC snapshots under READ COMMITTED: callers that need one consistent
view (the sweep) run them in a REPEATABLE READ transaction.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from app.db import Prepared, fetch_prepared_all, fetch_prepared_row
from app.domain.snapshot import (
    Attempt,
    BadDebtPayment,
    CustomerDefault,
    Invoice,
    PaymentMethod,
    Retry,
    Snapshot,
    Subscription,
    collection_paused,
    trusted,
)
from app.domain.state import DunningState, MandateState
from app.recompute.gather import DUNNING_COLUMNS, charges, invoice_lines, stored_state
from tasks.failures import INFRASTRUCTURE

# Per account: its id, bad-debt flag, stored version and stored state, the state as the text of one
# JSON array (NULL without a subs_dunning row). One text value instead of fifteen columns: psycopg2
# converts one value per row instead of fifteen, and equal states (most accounts: "current, nothing
# unpaid" with the same reasons and entitlements) are recognised by one string, parsed once per page.
# Then when the stored state was decided (changed_at: no decision is computed at an earlier moment),
# apart, so that equal states stay one string.
_DUNNING = ("a.account_id, a.bad_debt, d.version, CASE WHEN d.account_id IS NOT NULL THEN json_build_array("
            + ", ".join(f"d.{c}" for c in DUNNING_COLUMNS) + ")::text END, d.changed_at "
            "FROM subs_account a LEFT JOIN subs_dunning d ON d.account_id = a.account_id ")

# The keyset page and its stored state in one statement (the sweep's walk).
# ``d.account_id > $1`` is implied by the join; said, it lets the merge join start at $1 instead of the
# first row of subs_dunning.
PAGE = Prepared("dunning_batch_page", "SELECT " + _DUNNING.replace("ON d.account_id", "ON d.account_id > $1 AND "
                "d.account_id") + "WHERE a.account_id > $1 ORDER BY a.account_id LIMIT $2", ("text", "int"))
# The sweep's walk in ranges: the accounts in ($1, $2], and where the range of the next $2 accounts
# after $1 ends (no row: fewer are left). Ranges, unlike LIMIT pages, can be read side by side: each
# range's end is known before the range before it has been read.
RANGE = Prepared("dunning_batch_range", "SELECT " + _DUNNING.replace(
    "ON d.account_id", "ON d.account_id > $1 AND d.account_id <= $2 AND d.account_id")
    + "WHERE a.account_id > $1 AND a.account_id <= $2 ORDER BY a.account_id", ("text", "text"))
RANGE_END = Prepared("dunning_batch_range_end", "SELECT account_id FROM subs_account WHERE account_id > $1 "
                     "ORDER BY account_id OFFSET $2 - 1 LIMIT 1", ("text", "int"))
ACCOUNTS = Prepared("dunning_batch_accounts", "SELECT " + _DUNNING + "WHERE a.account_id = ANY($1) "
                    "ORDER BY a.account_id", ("text[]",))

# Everything else about the accounts in [$1, $2], one row of JSON arrays (one per table, ordered by
# account, then by the key gather_many's json_agg orders by). Account-keyed tables are one index range
# scan each. The Stripe mirror is keyed by customer: its rows carry the account they are filed under
# (account_key, migration mirror_account_key), so a customer filed under the account subs_customer
# names ("filed") is read by one range scan per table too. The others ("unfiled": never filed,
# filed elsewhere, or moved to another account since) are reached through their stripe_customer_id,
# one index probe each (LATERAL ... OFFSET 0: the generic plan would otherwise hash whole mirror
# tables), and rows filed here for a customer that subs_customer now puts elsewhere ("moved")
# are left out of the range scans. subs_customer decides, as in gather_many. Payment retries follow
# their invoice, not the account that claimed them (a customer moved by another team takes its
# invoices' retry history with it): read by the range's invoices, one index probe each.
_MIRROR = {  # table alias -> (table, the columns read)
    "i": ("stripe_invoice", "id, status, billing_reason, subscription_id, amount_due, amount_paid, "
                            "amount_remaining, created, lines, currency, total, credited_amount, attempt_count, "
                            "due_date, first_failed_at, last_failed_at, paid_at, voided_at, marked_uncollectible_at, "
                            "stripe_customer_id, lines_incomplete"),
    "p": ("stripe_payment_attempt", "id, invoice_id, payment_method_id, status, attempted_at, amount, amount_refunded, "
                                    "decline_code, failure_code, advice_code, charges, failed_at, stripe_customer_id"),
    "m": ("stripe_payment_method", "id, type, attached, changed_at, exp_month, exp_year, card_brand, card_last4, "
                                   "stripe_customer_id, fingerprint"),
    "s": ("stripe_customer_state", "default_payment_method_id, changed_at, source_created, stripe_customer_id"),
    "b": ("stripe_subscription", "id, status, products, collection_paused"),
}


def _mirror_rows(alias: str) -> str:
    """(account_id, columns...) of the range's mirror rows in ``alias``'s table: filed + unfiled."""
    table, columns = _MIRROR[alias]
    cols = ", ".join(f"{alias}.{c.strip()}" for c in columns.split(","))
    return (f"SELECT {alias}.account_key AS account_id, {cols} FROM {table} {alias} "
            f"WHERE {alias}.account_key >= $1 AND {alias}.account_key <= $2 "
            f"AND {alias}.stripe_customer_id <> ALL((SELECT ids FROM moved)::text[]) "
            f"UNION ALL SELECT u.account_id, {cols} FROM unfiled u, LATERAL (SELECT * FROM {table} {alias} "
            f"WHERE {alias}.stripe_customer_id = u.stripe_customer_id OFFSET 0) {alias}")


# How long a recompute failing on an infrastructure failure (tasks/failures.py INFRASTRUCTURE: the
# database, the broker, lock contention) counts as on its way: beat re-drives it every 5 minutes
# (app/stuck_work.py), and such a failure says nothing about the recompute. Past it (twelve re-drives,
# about four sweeps at beat's 15 minutes, or two when a sweep takes longer than that) the account is
# drift again, which the rollout gate counts as a reverted remediation: a recompute that keeps
# failing. Without it, a remediation held up by an outage of a few minutes around a sweep counted as
# reverted, and stepped the rollout back as if remediating were wrong.
REDRIVE_GRACE = timedelta(hours=1)
_GRACE_SECONDS = int(REDRIVE_GRACE.total_seconds())
_INFRASTRUCTURE = ", ".join(f"'{kind.value}'" for kind in sorted(INFRASTRUCTURE))

# The recomputes already on their way for the range's accounts (not part of a snapshot: the sweep's
# business, app/sweep/sweep.py). Read in the range's own snapshot, so a stored state and whether its
# account awaits a recompute are one view: a recompute in flight deletes the request only in its own
# transaction, so the request is seen until its new state is. Three columns after the snapshots' eleven:
# * the requests (a webhook's, a re-drive's, a remediation's), each with whether it is parked: a
#   request a dead recompute had taken, which nothing re-sends (app/redrive.py STALE_REQUESTS);
# * the review times (subs_dunning.next_review_at): once due, beat's re-drive requests the account
#   within a tick, except after a dead recompute since the review came due (redrive.DUE_REVIEWS);
# * the accounts an unroutable event now routes to (beat's re-drive, every 30 s, routes it and
#   requests the recompute: app/redrive.py ROUTE_UNROUTABLE), by
#   - its customer, once subs_customer maps it. Looked for among the range's unfiled customers only,
#     an index probe each: a customer mapped since its first mirror row arrived stays unfiled until
#     tasks.refile_mirror (every 5 minutes) files it, and the re-drive has routed its events long
#     before, almost always;
#   - the invoice or payment intent it names when it names no customer (stripe_event.route_invoice_id
#     / route_payment_intent_id: invoice_payment.paid, a dispute, stored before the mirror filed what
#     they name under a customer), once the range's invoices / attempts have it: one probe per invoice
#     and attempt of the range into the partial indexes of the unroutable events by those columns
#     (migration unroutable_routing_cursor), which hold no entry for an event routed at ingest.
_PENDING = f"""
  (SELECT json_agg(json_build_array(q.account_id,
          -- stalled: parked by a dead recompute (nothing re-sends it), or its recompute failing
          -- (retrying: beat re-drives it, maybe for ever); either way no run is sure to come. Not yet
          -- a recompute that an infrastructure failure has kept failing for less than REDRIVE_GRACE
          -- (by the database's clock, which wrote first_failed_at): the re-drive sends it.
          (q.parked_touch IS NOT DISTINCT FROM q.touched_at AND EXISTS (
            SELECT 1 FROM subs_stuck_events s WHERE s.account_id = q.account_id
               AND s.task_name = 'tasks.recompute_account' AND s.state = 'dead'))
          OR EXISTS (SELECT 1 FROM subs_stuck_events s WHERE s.account_id = q.account_id
                        AND s.task_name = 'tasks.recompute_account' AND s.state = 'retrying'
                        AND NOT (s.error_class IN ({_INFRASTRUCTURE})
                                 AND s.first_failed_at > now() - interval '{_GRACE_SECONDS} seconds'))))
     FROM recompute_request q WHERE q.account_id >= $1 AND q.account_id <= $2),
  (SELECT json_agg(json_build_array(d.account_id, d.next_review_at))
     FROM subs_dunning d
    WHERE d.account_id >= $1 AND d.account_id <= $2 AND d.next_review_at IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM subs_stuck_events s
                       WHERE s.account_id = d.account_id AND s.task_name = 'tasks.recompute_account'
                         AND s.state = 'dead' AND s.last_failed_at >= d.next_review_at)),
  (SELECT json_agg(DISTINCT x.account_id) FROM (
     SELECT u.account_id FROM unfiled u
      WHERE EXISTS (SELECT 1 FROM stripe_event e
                     WHERE e.stripe_customer_id = u.stripe_customer_id AND e.state = 'unroutable')
     UNION ALL
     SELECT i.account_id FROM inv i
      WHERE EXISTS (SELECT 1 FROM stripe_event e
                     WHERE e.route_invoice_id = i.id AND e.state = 'unroutable' AND e.stripe_customer_id IS NULL)
     UNION ALL
     SELECT p.account_id FROM att p
      WHERE EXISTS (SELECT 1 FROM stripe_event e
                     WHERE e.route_payment_intent_id = p.id AND e.state = 'unroutable'
                       AND e.stripe_customer_id IS NULL
                       -- the re-drive takes the invoice's customer first, when the mirror has one
                       AND NOT EXISTS (SELECT 1 FROM stripe_invoice ri WHERE ri.id = e.route_invoice_id
                                          AND ri.stripe_customer_id IS NOT NULL))) x)"""

DETAILS = Prepared("dunning_batch_details", f"""
WITH c AS MATERIALIZED (  -- the range's customers (subs_customer: the truth)
  SELECT account_id, stripe_customer_id FROM subs_customer WHERE account_id >= $1 AND account_id <= $2),
f AS MATERIALIZED (  -- the customers whose mirror rows are filed under the range's accounts
  SELECT account_key AS account_id, stripe_customer_id FROM mirror_customer
   WHERE account_key >= $1 AND account_key <= $2),
differ AS MATERIALIZED (  -- where the two disagree (in steady state: nobody)
  SELECT c.account_id AS c_account, c.stripe_customer_id AS c_customer, f.stripe_customer_id AS f_customer
    FROM c FULL JOIN f USING (account_id, stripe_customer_id) WHERE c.account_id IS NULL OR f.account_id IS NULL),
unfiled AS MATERIALIZED (
  SELECT c_account AS account_id, c_customer AS stripe_customer_id FROM differ WHERE c_customer IS NOT NULL),
moved AS MATERIALIZED (
  SELECT ARRAY(SELECT f_customer FROM differ WHERE f_customer IS NOT NULL) AS ids),
inv AS MATERIALIZED (  -- read once: listed, and the way to their retries and the attempts known only through them
  {_mirror_rows("i")}),
att AS MATERIALIZED (  -- read once: listed, and the payment intents unroutable events may route through
  {_mirror_rows("p")}
  UNION ALL  -- attempts known only through their invoice (invoice_payment.paid)
  SELECT i.account_id, p.id, p.invoice_id, p.payment_method_id, p.status, p.attempted_at, p.amount,
         p.amount_refunded, p.decline_code, p.failure_code, p.advice_code, p.charges, p.failed_at, p.stripe_customer_id
    FROM inv i, LATERAL (SELECT * FROM stripe_payment_attempt p
          WHERE p.invoice_id = i.id AND p.stripe_customer_id IS NULL OFFSET 0) p)
SELECT
  (SELECT json_agg(json_build_array(i.account_id, i.id, i.status, i.billing_reason, i.subscription_id, i.amount_due,
          i.amount_paid, i.amount_remaining, i.created, i.lines, i.currency, i.total, i.credited_amount,
          i.attempt_count, i.due_date, i.first_failed_at, i.last_failed_at, i.paid_at, i.voided_at,
          i.marked_uncollectible_at, i.stripe_customer_id, i.lines_incomplete) ORDER BY i.account_id, i.id)
     FROM inv i),
  (SELECT json_agg(json_build_array(p.account_id, p.id, p.invoice_id, p.payment_method_id, p.status, p.attempted_at,
          p.amount, p.amount_refunded, p.decline_code, p.failure_code, p.advice_code, p.charges, p.failed_at,
          p.stripe_customer_id) ORDER BY p.account_id, p.id)
     FROM att p),
  (SELECT json_agg(json_build_array(m.account_id, m.id, m.type, m.attached, m.changed_at, m.exp_month, m.exp_year,
          m.card_brand, m.card_last4, m.stripe_customer_id, m.fingerprint) ORDER BY m.account_id, m.id)
     FROM ({_mirror_rows("m")}) m),
  (SELECT json_agg(json_build_array(s.account_id, s.default_payment_method_id, s.changed_at, s.stripe_customer_id)
          ORDER BY s.account_id, s.source_created DESC, s.stripe_customer_id)
     FROM ({_mirror_rows("s")}) s),
  (SELECT json_agg(json_build_array(b.account_id, b.id, b.status, b.products, b.collection_paused)
          ORDER BY b.account_id, b.id)
     FROM ({_mirror_rows("b")}) b),
  (SELECT json_agg(json_build_array(i.account_id, r.invoice_id, r.payment_method_id, r.retry_number, r.free, r.state,
          r.scheduled_for, r.created_at, r.method_change_seen_at) ORDER BY i.account_id, r.id)
     FROM inv i, LATERAL (SELECT * FROM payment_retry r WHERE r.invoice_id = i.id OFFSET 0) r),
  (SELECT json_agg(json_build_array(b.account_id, b.id, b.state, b.amount, b.created_at, b.updated_at,
          b.failure_reason, b.stripe_payment_intent_id, b.invoice_ids) ORDER BY b.account_id, b.id)
     FROM bad_debt_payment b WHERE b.account_id >= $1 AND b.account_id <= $2),
  (SELECT json_agg(json_build_array(m.account_id, m.payment_method_id, m.type, m.status, m.status_reason,
          m.is_default, m.card_brand, m.card_last4, m.exp_month, m.exp_year) ORDER BY m.account_id, m.payment_method_id)
     FROM subs_mandate m WHERE m.account_id >= $1 AND m.account_id <= $2),
  (SELECT json_agg(json_build_array(e.account_id, e.n)) FROM (
     SELECT e.account_id, count(*) AS n FROM subs_stuck_events e
      WHERE e.account_id >= $1 AND e.account_id <= $2 AND e.state <> 'resolved' GROUP BY e.account_id) e),
  (SELECT json_agg(json_build_array(e.account_id, e.entered_at)) FROM (
     SELECT e.account_id, min(e.entered_at) AS entered_at FROM bad_debt_episode e
      WHERE e.account_id >= $1 AND e.account_id <= $2 AND e.exited_at IS NULL GROUP BY e.account_id) e),
  -- Other accounts' payments in flight on an invoice a range's account owns now (the customer moved
  -- here while it ran), by that account: the pending payments are few (partial index), each of
  -- their invoices one probe.
  (SELECT json_agg(json_build_array(o.account_id, b.id, b.state, b.amount, b.created_at, b.updated_at,
          b.failure_reason, b.stripe_payment_intent_id, b.invoice_ids) ORDER BY o.account_id, b.id)
     FROM bad_debt_payment b, LATERAL (
          SELECT DISTINCT c.account_id FROM jsonb_array_elements_text(b.invoice_ids) AS x(id)
            JOIN stripe_invoice i ON i.id = x.id
            JOIN subs_customer c ON c.stripe_customer_id = i.stripe_customer_id
           WHERE c.account_id >= $1 AND c.account_id <= $2 AND c.account_id <> b.account_id) o
    WHERE b.state = 'pending'),
  {_PENDING}
""", ("text", "text"))



def _t(value: str | None) -> datetime | None:
    # json_build_array renders timestamptz in ISO 8601 in the session zone (UTC, set on connect).
    return datetime.fromisoformat(value) if value is not None else None


def _tt(value: str) -> datetime:
    return datetime.fromisoformat(value)


class _StoredStates:
    """The stored states of one batch, one immutable DunningState per distinct state text: accounts
    with equal states share it (per batch, so memory stays flat)."""

    def __init__(self) -> None:
        self.seen: dict[str, DunningState] = {}

    def get(self, text: str | None) -> DunningState | None:
        if text is None:
            return None
        state = self.seen.get(text)
        if state is None:
            state = self.seen[text] = stored_state(json.loads(text))
        return state


def _invoice(i: Any) -> Invoice:
    return trusted(Invoice, {
        "id": i[1], "status": i[2], "billing_reason": i[3], "subscription_id": i[4], "amount_due": i[5],
        "amount_paid": i[6], "amount_remaining": i[7], "created": _tt(i[8]),
        "lines": invoice_lines(i[9]),
        "currency": i[10], "total": i[11], "credited_amount": i[12], "attempt_count": i[13], "due_date": _t(i[14]),
        "first_failed_at": _t(i[15]), "last_failed_at": _t(i[16]), "paid_at": _t(i[17]), "voided_at": _t(i[18]),
        "marked_uncollectible_at": _t(i[19]), "stripe_customer_id": i[20], "lines_incomplete": bool(i[21])})


def _attempt(p: Any) -> Attempt:
    return trusted(Attempt, {
        "id": p[1], "invoice_id": p[2], "payment_method_id": p[3], "status": p[4], "attempted_at": _tt(p[5]),
        "amount": p[6], "amount_refunded": p[7], "decline_code": p[8], "failure_code": p[9], "advice_code": p[10],
        "charges": charges(p[11]), "failed_at": _t(p[12]), "stripe_customer_id": p[13]})


def _method(p: Any) -> PaymentMethod:
    return PaymentMethod(id=p[1], type=p[2], attached=p[3], changed_at=_tt(p[4]), exp_month=p[5], exp_year=p[6],
                         card_brand=p[7], card_last4=p[8], stripe_customer_id=p[9], fingerprint=p[10])


def _customer_default(s: Any) -> CustomerDefault:
    return CustomerDefault(stripe_customer_id=s[3], payment_method_id=s[1], changed_at=_t(s[2]))


def _retry(x: Any) -> Retry:
    return Retry(invoice_id=x[1], payment_method_id=x[2], retry_number=x[3], free=x[4], state=x[5],
                 scheduled_for=_tt(x[6]), created_at=_tt(x[7]), method_change_seen_at=_t(x[8]))


def _payment(b: Any) -> BadDebtPayment:
    return BadDebtPayment(id=b[1], state=b[2], amount=b[3], created_at=_tt(b[4]), updated_at=_tt(b[5]),
                          failure_reason=b[6], stripe_payment_intent_id=b[7], invoice_ids=tuple(b[8] or ()))


def _mandate(x: Any) -> MandateState:
    return MandateState(payment_method_id=x[1], type=x[2], status=x[3], status_reason=x[4], is_default=x[5],
                        card_brand=x[6], card_last4=x[7], exp_month=x[8], exp_year=x[9])


def _subscription(s: Any) -> Subscription:
    return trusted(Subscription, {"id": s[1], "status": s[2], "products": tuple(s[3] or ()),
                                  "collection_paused": collection_paused(s[4])})


EMPTY: tuple[Any, ...] = ()


def _by_account(rows: list[Any] | None, build: Callable[[Any], Any]) -> dict[str, tuple[Any, ...]]:
    """One store's rows (ordered by account, then as gather_many orders them), built into domain
    objects, by account. Walks the rows, not the accounts: most accounts have none in most stores."""
    grouped: dict[str, list[Any]] = {}
    for row in rows or ():
        item = build(row)
        bucket = grouped.get(row[0])
        if bucket is None:
            grouped[row[0]] = [item]
        else:
            bucket.append(item)
    return {account_id: tuple(items) for account_id, items in grouped.items()}


def _snapshots(conn: Connection, accounts: list[Any]) -> dict[str, tuple[Snapshot, int]]:
    """Snapshots of ``accounts`` (rows of the account statements, ordered by account id)."""
    return build_snapshots(accounts, read_details(conn, accounts))


def read_details(conn: Connection, accounts: list[Any]) -> Any:
    """The DETAILS row for ``accounts`` (None for no accounts): the database half of a page."""
    if not accounts:
        return None
    return fetch_prepared_row(conn, (DETAILS, (accounts[0][0], accounts[-1][0])))


def build_snapshots(accounts: list[Any], details: Any) -> dict[str, tuple[Snapshot, int]]:
    """The Python half: account rows + their DETAILS row -> {id: (snapshot, stored version)}."""
    if not accounts:
        return {}
    invoices, attempts, methods, defaults, subscriptions, retries, payments, mandates = (
        _by_account(details[n], build) for n, build in ((0, _invoice), (1, _attempt), (2, _method),
                                                        (3, _customer_default), (4, _subscription), (5, _retry),
                                                        (6, _payment), (7, _mandate)))
    elsewhere = _by_account(details[10], _payment)
    stuck = {x[0]: int(x[1]) for x in details[8] or ()}
    episodes = {x[0]: x[1] for x in details[9] or ()}
    out: dict[str, tuple[Snapshot, int]] = {}
    stored = _StoredStates()
    for r in accounts:
        account_id = r[0]
        customer_defaults = defaults.get(account_id, EMPTY)
        # the latest customer's state first: gather_many takes the first too
        state = customer_defaults[0] if customer_defaults else None
        episode = episodes.get(account_id)
        # Every field of Snapshot, in its order (``trusted`` fills in no default).
        out[account_id] = (trusted(Snapshot, {
            "account_id": account_id,
            "stored": stored.get(r[3]),
            "stored_bad_debt_flag": bool(r[1]),
            "invoices": invoices.get(account_id, EMPTY),
            "attempts": attempts.get(account_id, EMPTY),
            "payment_methods": methods.get(account_id, EMPTY),
            "default_payment_method_id": state.payment_method_id if state is not None else None,
            "default_payment_method_changed_at": state.changed_at if state is not None else None,
            "customer_defaults": customer_defaults,
            "subscriptions": subscriptions.get(account_id, EMPTY),
            "retries": retries.get(account_id, EMPTY),
            "bad_debt_payments": payments.get(account_id, EMPTY),
            "payments_elsewhere": elsewhere.get(account_id, EMPTY),
            "stored_mandates": mandates.get(account_id, EMPTY),
            "open_stuck_events": stuck.get(account_id, 0),
            "open_episode_entered_at": _tt(episode) if episode is not None else None,
            "stored_changed_at": r[4],
            "extra": {},
        }), int(r[2] or 0))
    return out


@dataclass(frozen=True)
class Pending:
    """The accounts of a page whose recompute is already on its way (the _PENDING columns): their
    stored state may lag what compute decides now, by design, until that recompute runs."""

    requested: frozenset[str] = frozenset()  # a live request, or an unroutable event to route to them
    # A request no run is sure to take: parked by a dead recompute (nothing re-sends it), or whose
    # recompute keeps failing (retrying; on an infrastructure failure, for longer than REDRIVE_GRACE:
    # until then it is requested, the re-drive sends it). Its drift is drift: recorded, remediated,
    # and should it never take, found again by the next sweep, which the rollout gate counts as reverted.
    stalled: frozenset[str] = frozenset()
    reviews: dict[str, datetime] = field(default_factory=dict)  # next_review_at (no dead run since)

    def pending(self, account_id: str, now: datetime) -> bool:
        """A recompute requested, or the review due (beat's re-drive requests it)."""
        if account_id in self.requested:
            return True
        review = self.reviews.get(account_id)
        return review is not None and review <= now


NOTHING_PENDING = Pending()


def build_pending(details: Any) -> Pending:
    """The recomputes on their way for the accounts of a DETAILS row (None: no accounts)."""
    if details is None:
        return NOTHING_PENDING
    requests, reviews, unroutable = details[11] or (), details[12] or (), details[13] or ()
    if not (requests or reviews or unroutable):  # the common page
        return NOTHING_PENDING
    return Pending(requested=frozenset([a for a, stalled in requests if not stalled] + list(unroutable)),
                   stalled=frozenset(a for a, stalled in requests if stalled),
                   reviews={a: _tt(at) for a, at in reviews})


def gather_batch(conn: Connection, account_ids: Sequence[str]) -> dict[str, tuple[Snapshot, int]]:
    """{id: (snapshot, stored version)} for the accounts that exist: the same as gather_many.

    Made for keyset pages: the details are read for the whole id range from the smallest to the
    largest id (rows of accounts in that range but not asked for are read and dropped).
    """
    if not account_ids:
        return {}
    accounts = fetch_prepared_all(conn, (ACCOUNTS, (sorted(set(account_ids)),)))
    return _snapshots(conn, accounts)


def gather_page(conn: Connection, after: str, limit: int) -> tuple[list[str], dict[str, tuple[Snapshot, int]]]:
    """The next keyset page of accounts after ``after``: (ids in order, {id: (snapshot, stored version)})."""
    accounts, details = read_page(conn, after, limit)
    return [r[0] for r in accounts], build_snapshots(accounts, details)


def read_page(conn: Connection, after: str, limit: int) -> tuple[list[Any], Any]:
    """The database half of gather_page: (account rows in id order, their DETAILS row)."""
    accounts = fetch_prepared_all(conn, (PAGE, (after, limit)))
    return accounts, read_details(conn, accounts)


def range_end(conn: Connection, after: str, size: int) -> str | None:
    """The id of the ``size``-th account after ``after``; None when fewer are left."""
    row = fetch_prepared_row(conn, (RANGE_END, (after, size)))
    return row[0] if row is not None else None


def read_range(conn: Connection, after: str, upto: str | None) -> tuple[list[Any], Any]:
    """The accounts in (``after``, ``upto``] (every one after ``after`` when ``upto`` is None) and
    their DETAILS row: the database half of a range of the sweep's walk."""
    if upto is None:
        accounts = fetch_prepared_all(conn, (PAGE, (after, None)))  # LIMIT NULL: no limit
    else:
        accounts = fetch_prepared_all(conn, (RANGE, (after, upto)))
    return accounts, read_details(conn, accounts)
