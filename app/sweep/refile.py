"""File Stripe customers' mirror rows under the account subs_customer names now.

A customer's mirror rows carry the account they are filed under (``account_key``, migration
mirror_account_key), so the sweep reads a range of accounts' rows with one range scan per table.
A customer is filed when its first mirror row arrives; it needs filing again when subs_customer
(owned by other teams) maps it only later, maps it to another account, no longer maps it (the
owner deleted the row: filed under no account, and the account it left recomputed), or maps a
customer that has no mirror rows yet (filed, such a customer is read without any probe). Until then the sweep reaches
the customer's rows through its stripe_customer_id: filing changes how fast the sweep reads,
never what it reads.

A customer that moves from one account to another takes its invoices with it, and their payment
retries (compute reads them by invoice, not by the account that claimed them, so the new account
goes on with each invoice's schedule and cap; app/payments/retries.py and pay.py charge no retry for
an account that no longer owns its invoice): both accounts are recomputed (a request each, in the
transaction that files the move; the caller sends them). Other teams change subs_customer in the
database, with no event to us, and until then the old account kept the dunning state of invoices it
no longer owns (the drift sweep remediates only inside the rollout stage).

Each call files at most ``limit`` customers in one short transaction. The candidates are found
first without a lock (``find_candidates``); the transaction (``file_candidates``) then takes SHARE ROW
EXCLUSIVE on mirror_customer (mirror writers in flight finish first, new ones wait until the commit),
looks again at those candidates only, and moves their rows. What it looks at again may differ from
what was found: the owner may map a customer to a third account in between. The filing returns what
it did (each customer's account left and account filed under), and an account it touched that the
requests made before the lock did not name is requested after the commit: the filing filed the
customer's rows under that account, so no later refile sees the move, and the account kept none of
the invoice's dunning state (nor a retry of it) until a later event or the drift sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine

from app.db import unit_of_work
from app.domain.triggers import Trigger
from webhooks.store import request_recompute

MIRROR_TABLES = ("stripe_invoice", "stripe_payment_attempt", "stripe_payment_method", "stripe_customer_state",
                 "stripe_subscription")

# Customers whose filing disagrees with subs_customer (never filed included), as (customer, account
# filed under, account mapped to, whether the mirror knew the customer): those subs_customer maps
# elsewhere, and those it no longer maps at all (the owner deleted the row: filed under no account).
CANDIDATES = """
SELECT c.stripe_customer_id, m.account_key, c.account_id, m.stripe_customer_id IS NOT NULL
  FROM subs_customer c LEFT JOIN mirror_customer m USING (stripe_customer_id)
 WHERE m.account_key IS DISTINCT FROM c.account_id
UNION ALL
SELECT m.stripe_customer_id, m.account_key, NULL, true
  FROM mirror_customer m
 WHERE m.account_key IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM subs_customer c WHERE c.stripe_customer_id = m.stripe_customer_id)
 LIMIT %(limit)s
"""

# Of the accounts to recompute, those that still exist: the owner may have deleted the account with
# its customer rows, and its recompute would only end as a dead stuck row (AccountNotFound).
EXISTING = "SELECT account_id FROM subs_account WHERE account_id = ANY(%(ids)s)"

# Files the candidates again as subs_customer maps them now; -> what it filed, as CANDIDATES' rows.
REFILE = ("""
WITH todo AS MATERIALIZED (
  SELECT c.stripe_customer_id, m.account_key AS previous, c.account_id, m.stripe_customer_id IS NOT NULL AS known
    FROM subs_customer c LEFT JOIN mirror_customer m USING (stripe_customer_id)
   WHERE c.stripe_customer_id = ANY(%(ids)s) AND m.account_key IS DISTINCT FROM c.account_id
  UNION ALL
  SELECT m.stripe_customer_id, m.account_key, NULL, true FROM mirror_customer m
   WHERE m.stripe_customer_id = ANY(%(ids)s) AND m.account_key IS NOT NULL
     AND NOT EXISTS (SELECT 1 FROM subs_customer c WHERE c.stripe_customer_id = m.stripe_customer_id)),
""" + ",\n".join(
    f"{table} AS (UPDATE {table} t SET account_key = todo.account_id FROM todo "
    f"WHERE t.stripe_customer_id = todo.stripe_customer_id)" for table in MIRROR_TABLES) + """,
filed AS (
  INSERT INTO mirror_customer (stripe_customer_id, account_key, filed_at)
  SELECT stripe_customer_id, account_id, now() FROM todo
  ON CONFLICT (stripe_customer_id) DO UPDATE SET account_key = EXCLUDED.account_key, filed_at = now())
SELECT stripe_customer_id, previous, account_id, known FROM todo
""")

RECOMPUTE_TRIGGER = Trigger.STATE_REFRESH.value


# A candidate, and a customer filed: (customer, account filed under before, account subs_customer maps
# it to, whether the mirror knew the customer).
Candidate = tuple[str, "str | None", "str | None", bool]


@dataclass
class Refiled:
    filed: int = 0
    # (account, cause) of each recompute request this created: the caller sends them after commit
    # (else beat's stale-request re-drive does).
    requested: list[tuple[str, str]] = field(default_factory=list)
    # (customer, account it left, account it was filed under) of each customer filed.
    moves: list[tuple[str, str | None, str | None]] = field(default_factory=list)


def refile_customers(engine: Engine, limit: int = 5000) -> Refiled:
    """File up to ``limit`` customers under their subs_customer account, and request the recompute
    of both accounts of each customer that moved."""
    return file_candidates(engine, find_candidates(engine, limit))


def find_candidates(engine: Engine, limit: int = 5000) -> list[Candidate]:
    """Up to ``limit`` customers whose filing disagrees with subs_customer, read without a lock."""
    with engine.connect() as conn:
        found = [(c, p, n, bool(k)) for c, p, n, k in conn.exec_driver_sql(CANDIDATES, {"limit": limit})]
        conn.rollback()
    return found


def _moved(customers: list[Candidate]) -> set[tuple[str, str]]:
    """(account, cause) of each account to recompute for these customers' filing.

    A customer filed for the first time moved nothing: its events waited unroutable, and the
    re-drive routes them (app/redrive.py). A customer the mirror knew under no account may instead
    be one the owner unmapped and maps again (its events were routed long ago, none waits): its
    new account is recomputed (for a first mapping, a recompute more than the re-drive's). A
    customer unmapped recomputes the account it was filed under, which no longer owns its invoices."""
    return {(account, f"customer_moved:{customer}")
            for customer, previous, new, known in customers if previous is not None or known
            for account in (previous, new) if account is not None}


def _request(conn: Connection, moved: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Requests the recompute of each (account, cause) whose account still exists; -> those this created."""
    if not moved:
        return []
    existing = set(conn.exec_driver_sql(EXISTING, {"ids": sorted({a for a, _ in moved})}).scalars())
    return [(account, cause) for account, cause in moved
            if account in existing and request_recompute(conn, account, RECOMPUTE_TRIGGER, cause)]


def file_candidates(engine: Engine, candidates: list[Candidate]) -> Refiled:
    """File ``candidates`` as subs_customer maps them now, and request the recompute of the accounts
    each one left and was filed under."""
    done = Refiled()
    if not candidates:
        return done
    # A move found here but filed by someone else before the lock only costs a recompute more.
    moved = sorted(_moved(candidates))
    with unit_of_work(engine) as conn:
        # The requests first (in account order), then the mirror's lock: ingest locks an account's
        # request row and then, through its mirror trigger, mirror_customer; the other order could
        # deadlock with it.
        done.requested = _request(conn, moved)
        conn.exec_driver_sql("LOCK TABLE mirror_customer IN SHARE ROW EXCLUSIVE MODE")
        filed = [(c, p, n, bool(k)) for c, p, n, k in
                 conn.exec_driver_sql(REFILE, {"ids": [c[0] for c in candidates]})]
    done.filed = len(filed)
    done.moves = [(customer, previous, new) for customer, previous, new, _ in filed]
    # The owner mapped a customer to another account between the read and the lock: its rows went to
    # an account not requested above (nor, when the mirror had moved it meanwhile, the account it
    # left). Requested now, after the commit, for the lock order above; the accounts requested above
    # had their request row held until the commit, so no run of theirs read the filing before it.
    covered = {account for account, _ in moved}
    missed = sorted((account, cause) for account, cause in _moved(filed) if account not in covered)
    if missed:
        with unit_of_work(engine) as conn:
            done.requested += _request(conn, missed)
    return done
