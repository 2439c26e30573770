"""Apply: write only the difference between the stored and the desired state.

Runs inside the recompute transaction, under the per-account advisory lock. Nothing is written
when the decision equals what is stored: no UPDATE, no version bump, no event.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime

from psycopg2.extras import Json
from sqlalchemy import Connection

from app.domain.compute import Decision
from app.domain.events import DomainEvent, derive_events, entry_reason
from app.domain.snapshot import Snapshot
from app.domain.state import DunningState, MandateState, Status
from app.recompute.emit import outbox_insert

JSON_COLUMNS = frozenset({"reasons", "entitlements", "actions_requested", "outstanding", "announced_failures"})
BAD_DEBT_STATES = (Status.BAD_DEBT, Status.LIFTING)


@dataclass(frozen=True)
class Applied:
    changed_fields: list[str]
    events: list[DomainEvent]
    version: int
    mandates_changed: int = 0
    bad_debt_flag_changed: bool = False
    episode: str | None = None  # "opened" | "joined" | "closed"
    # The products of the episode opened or closed; of one joined, the products that joined it.
    episode_products: tuple[str, ...] = ()
    episode_reason: str | None = None  # of an episode joined: its reason (its entry's)
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def wrote(self) -> bool:
        return bool(self.changed_fields or self.mandates_changed or self.bad_debt_flag_changed)


def _params(columns: dict[str, object]) -> dict[str, object]:
    return {k: Json(v) if k in JSON_COLUMNS else v for k, v in columns.items()}


def _state_write(snapshot: Snapshot, decision: Decision, changed: list[str], version: int, trigger: str,
                 now: datetime) -> tuple[str, dict[str, object]]:
    """The statement that writes the changed columns, and its parameters."""
    columns = decision.state.to_columns(changed)
    params = _params(columns)
    params.update(account=snapshot.account_id, version=version, trigger=trigger, now=now)
    if snapshot.stored is None:
        names = list(columns)
        return (f"INSERT INTO subs_dunning (account_id, {', '.join(names)}, version, last_trigger, changed_at) "
                f"VALUES (%(account)s, {', '.join(f'%({n})s' for n in names)}, %(version)s, %(trigger)s, %(now)s)",
                params)
    sets = ", ".join(f"{n} = %({n})s" for n in columns)
    return (f"UPDATE subs_dunning SET {sets}, version = %(version)s, last_trigger = %(trigger)s, "
            f"changed_at = %(now)s WHERE account_id = %(account)s", params)


def _write_mandates(conn: Connection, account_id: str, stored: tuple[MandateState, ...],
                    desired: tuple[MandateState, ...], now: datetime) -> int:
    before = {m.payment_method_id: m for m in stored}
    changed = [m for m in desired if before.get(m.payment_method_id) != m]
    if not changed:
        return 0
    conn.exec_driver_sql(
        """
        INSERT INTO subs_mandate (payment_method_id, account_id, type, status, status_reason, is_default,
                                  card_brand, card_last4, exp_month, exp_year, updated_at)
        VALUES (%(payment_method_id)s, %(account)s, %(type)s, %(status)s, %(status_reason)s, %(is_default)s,
                %(card_brand)s, %(card_last4)s, %(exp_month)s, %(exp_year)s, %(now)s)
        ON CONFLICT (payment_method_id) DO UPDATE SET
          account_id = EXCLUDED.account_id, type = EXCLUDED.type, status = EXCLUDED.status,
          status_reason = EXCLUDED.status_reason, is_default = EXCLUDED.is_default,
          card_brand = EXCLUDED.card_brand, card_last4 = EXCLUDED.card_last4,
          exp_month = EXCLUDED.exp_month, exp_year = EXCLUDED.exp_year, updated_at = EXCLUDED.updated_at
        """,
        [{**asdict(m), "account": account_id, "now": now} for m in changed],
    )
    return len(changed)


# A product in bad debt that the open episode does not hold yet (another invoice suspended while the
# account is in bad debt) joins it: the episode's products are every product in bad debt during it, as
# its exit counts them. Returns the episode's reason and its products before (none when nothing joined).
JOIN_EPISODE_SQL = """
WITH ep AS (
  SELECT id, CASE WHEN jsonb_typeof(products) = 'array' THEN products ELSE '[]'::jsonb END AS products
    FROM bad_debt_episode WHERE account_id = %(account)s AND exited_at IS NULL FOR UPDATE
)
UPDATE bad_debt_episode e
   SET products = (SELECT jsonb_agg(p ORDER BY p) FROM (
                     SELECT jsonb_array_elements_text(ep.products)
                     UNION SELECT jsonb_array_elements_text(%(products)s::jsonb)) AS x(p))
  FROM ep
 WHERE e.id = ep.id AND NOT ep.products @> %(products)s::jsonb
RETURNING e.reason, ep.products
"""


def _episode(conn: Connection, snapshot: Snapshot, decision: Decision,
             now: datetime) -> tuple[str | None, tuple[str, ...], str | None]:
    """Open, join or close the account's bad-debt episode: ("opened" | "joined" | "closed" | None,
    its products (of "joined": the products that joined), the reason of an episode joined)."""
    before = snapshot.stored.status if snapshot.stored else Status.CURRENT
    after = decision.state.status
    # Entering bad debt, also straight into lifting (a bad-debt payment still in flight: derive_events'
    # BadDebtEntered says the same).
    if after in BAD_DEBT_STATES and before not in BAD_DEBT_STATES and snapshot.open_episode_entered_at is None:
        conn.exec_driver_sql(
            "INSERT INTO bad_debt_episode (account_id, entered_at, reason, failure_class, products) "
            "VALUES (%(account)s, %(now)s, %(reason)s, %(class)s, %(products)s)",
            {"account": snapshot.account_id, "now": now, "reason": entry_reason(decision),
             "class": decision.bad_debt_failure_class, "products": Json(list(decision.bad_debt_products))},
        )
        return "opened", decision.bad_debt_products, None
    if before in BAD_DEBT_STATES and after not in BAD_DEBT_STATES and snapshot.open_episode_entered_at is not None:
        # The decision has no bad-debt products any more: the episode remembers which they were.
        closed = conn.exec_driver_sql(
            "UPDATE bad_debt_episode SET exited_at = %(now)s, exit_how = %(how)s, "
            # Whole seconds cut down, as BadDebtExited counts them (a cast would round).
            "duration_seconds = GREATEST(0, FLOOR(EXTRACT(EPOCH FROM (%(now)s - entered_at))))::bigint "
            "WHERE account_id = %(account)s AND exited_at IS NULL RETURNING products",
            {"account": snapshot.account_id, "now": now,
             "how": decision.bad_debt_resolution or decision.resolution or "recomputed"},
        ).fetchall()
        return "closed", tuple(sorted({str(p) for (products,) in closed for p in products or ()})), None
    if (before in BAD_DEBT_STATES and after in BAD_DEBT_STATES and snapshot.open_episode_entered_at is not None
            and decision.bad_debt_products):
        joined = conn.exec_driver_sql(JOIN_EPISODE_SQL, {"account": snapshot.account_id,
                                                         "products": Json(list(decision.bad_debt_products))}).first()
        if joined is not None:
            reason, held = joined
            return "joined", tuple(sorted(set(decision.bad_debt_products) - {str(p) for p in held})), str(reason)
    return None, (), None


OPEN_EPISODE_REASON_SQL = """
SELECT reason FROM bad_debt_episode WHERE account_id = %(account)s AND exited_at IS NULL
 ORDER BY entered_at LIMIT 1
"""


def _requests_cancellation(stored: DunningState | None, decision: Decision) -> bool:
    """Whether the decision asks for a cancellation the stored state did not (an event to write)."""
    before = set(stored.actions_requested) if stored else set()
    return any(a.startswith("cancel:") for a in set(decision.state.actions_requested) - before)


def _open_episode_reason(conn: Connection, snapshot: Snapshot, decision: Decision) -> str | None:
    """The open bad-debt episode's reason, read only when a cancellation is requested in it: the
    request carries it, so the same request always has the same body (the relay's key is one per
    subscription and episode). Under the account lock, like gather's own read of the episode."""
    if snapshot.open_episode_entered_at is None or not _requests_cancellation(snapshot.stored, decision):
        return None
    reason = conn.exec_driver_sql(OPEN_EPISODE_REASON_SQL, {"account": snapshot.account_id}).scalar()
    return str(reason) if reason is not None else None


def apply(conn: Connection, snapshot: Snapshot, stored_version: int, decision: Decision, trigger: str,
          now: datetime) -> Applied:
    changed = decision.state.changed_fields(snapshot.stored)
    version = stored_version
    events: list[DomainEvent] = []
    episode: str | None = None
    episode_products: tuple[str, ...] = ()
    episode_reason: str | None = None
    if changed:
        version = stored_version + 1
        events = derive_events(snapshot.stored, decision, now, snapshot.open_episode_entered_at,
                               _open_episode_reason(conn, snapshot, decision))
        episode, episode_products, episode_reason = _episode(conn, snapshot, decision, now)
        # The state and its events in one round trip: two statements in one execute (its parameters
        # agree: the same account, version and time).
        sql, params = _state_write(snapshot, decision, changed, version, trigger, now)
        if events:
            outbox_sql, outbox_params = outbox_insert(snapshot.account_id, version, events, now)
            sql, params = f"{sql};\n{outbox_sql}", {**params, **outbox_params}
        conn.exec_driver_sql(sql, params)
    flag_changed = decision.bad_debt != snapshot.stored_bad_debt_flag
    if flag_changed:
        # The one column of the shared subs_account this product owns.
        conn.exec_driver_sql("UPDATE subs_account SET bad_debt = %(flag)s WHERE account_id = %(account)s",
                             {"flag": decision.bad_debt, "account": snapshot.account_id})
    mandates = _write_mandates(conn, snapshot.account_id, snapshot.stored_mandates, decision.mandates, now)
    return Applied(changed_fields=changed, events=events, version=version, mandates_changed=mandates,
                   bad_debt_flag_changed=flag_changed, episode=episode, episode_products=episode_products,
                   episode_reason=episode_reason)
