"""rollout_state (one row, id = 1) and rollout_history: read, change, audit.

Every change writes a rollout_history row (from, to, actor, reason, health) and an audit_log row in
the same transaction. Changes lock the state row so an operator and the gate never interleave, and
a change that names the stage it was decided from (an advance always does) is made from that stage
only: the second of two advances decided from one stage changes nothing. Every change adds one to
the rollout's revision; a change that names the revision it was decided at (the gate's always do) is
made at that revision only, so never on a later visit of the same stage (left and come back to).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg2.extras import Json
from sqlalchemy import Connection

from app.domain.rollout import STAGES, RolloutStatus, label, next_stage, previous_stage, shortlist

ACTIONS = ("advance", "hold", "rollback", "resume")


class RolloutError(ValueError):
    """The change is not possible; the message says why. As such: the current state does not allow
    it (advancing past 100%, holding twice), a conflict (409)."""


class RolloutInputError(RolloutError):
    """The request itself is bad (an unknown action, no reason, one too long): bad input (400).
    A RolloutError still, so a caller that only says why (the CLI) needs no second case."""


@dataclass(frozen=True)
class RolloutRow:
    stage: str
    held: bool
    named_accounts: tuple[str, ...]
    stage_entered_at: datetime
    updated_at: datetime
    last_gate_at: datetime | None = None
    last_gate_action: str | None = None
    last_gate_reason: str | None = None
    revision: int = 0  # one more at every audited change
    stage_revision: int = 0  # the revision the current stage visit began at

    @property
    def status(self) -> RolloutStatus:
        return RolloutStatus(self.stage, self.held, self.stage_entered_at, self.named_accounts, self.revision)

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "stage_label": label(self.stage), "held": self.held,
            "named_accounts": list(self.named_accounts), "stage_entered_at": self.stage_entered_at.isoformat(),
            "updated_at": self.updated_at.isoformat(), "revision": self.revision,
            "stage_revision": self.stage_revision,
            "last_gate": None if self.last_gate_at is None else {
                "at": self.last_gate_at.isoformat(), "action": self.last_gate_action, "reason": self.last_gate_reason},
        }


SELECT_STATE = """
SELECT stage, held, named_accounts, stage_entered_at, updated_at, last_gate_at, last_gate_action, last_gate_reason,
       revision, stage_revision
  FROM rollout_state WHERE id = 1
"""


def read_state(conn: Connection, for_update: bool = False) -> RolloutRow:
    row = conn.exec_driver_sql(SELECT_STATE + (" FOR UPDATE" if for_update else "")).first()
    if row is None:  # the migration seeds it; recreate rather than fail if someone deleted it
        conn.exec_driver_sql("INSERT INTO rollout_state (id, stage) VALUES (1, 'off') ON CONFLICT DO NOTHING")
        row = conn.exec_driver_sql(SELECT_STATE + (" FOR UPDATE" if for_update else "")).one()
    m = row._mapping
    return RolloutRow(stage=m["stage"], held=bool(m["held"]), named_accounts=tuple(m["named_accounts"] or ()),
                      stage_entered_at=m["stage_entered_at"], updated_at=m["updated_at"],
                      last_gate_at=m["last_gate_at"], last_gate_action=m["last_gate_action"],
                      last_gate_reason=m["last_gate_reason"], revision=int(m["revision"]),
                      stage_revision=int(m["stage_revision"]))


def history(conn: Connection, limit: int = 20) -> list[dict[str, Any]]:
    rows = conn.exec_driver_sql(
        "SELECT at, action, from_stage, to_stage, actor, reason, health, revision FROM rollout_history "
        "ORDER BY id DESC LIMIT %(limit)s", {"limit": limit}).fetchall()
    return [{"at": r.at.isoformat(), "action": r.action, "from_stage": r.from_stage, "to_stage": r.to_stage,
             "actor": r.actor, "reason": r.reason, "health": r.health, "revision": r.revision} for r in rows]


def _required(value: str | None, what: str) -> str:
    text = (value or "").strip()
    if not text:
        raise RolloutInputError(f"{what} is required")
    if len(text) > 2000:
        raise RolloutInputError(f"{what} is too long (at most 2000 characters)")
    return text


def parse_stage(text: str | None, what: str = "from_stage") -> str:
    """A stage as an operator writes it: its name (off, named, 5 ... 100) or its label (5%, named
    accounts), as `rollout status` and GET /ops/rollout show them. RolloutInputError otherwise."""
    raw = (text or "").strip().lower()
    stage = {"named accounts": "named"}.get(raw, raw.removesuffix("%").strip())
    if stage not in STAGES:
        raise RolloutInputError(f"{what} must be a stage ({', '.join(label(s) for s in STAGES)}), "
                                f"got {text!r}")
    return stage


def _last_change(conn: Connection) -> str:
    row = conn.exec_driver_sql(
        "SELECT at, action, actor FROM rollout_history WHERE from_stage <> to_stage ORDER BY id DESC LIMIT 1").first()
    return "" if row is None else f" ({row.action} by {row.actor} at {row.at.isoformat()})"


def parse_revision(value: Any, what: str = "revision") -> int:
    """A revision as `rollout status` and GET /ops/rollout show it: a whole number, 0 or more."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise RolloutInputError(f"{what} must be the rollout's revision as `dunning rollout status` or "
                                f"GET /ops/rollout shows it (a whole number), got {value!r}")
    return value


def _step(r: Any) -> str:
    """One history entry, said briefly: 'advance 10% -> 25% by gate at ...', 'hold at 10% by carol at ...'."""
    where = (f"{label(r.from_stage)} -> {label(r.to_stage)}" if r.from_stage != r.to_stage
             else f"at {label(r.from_stage)}")
    return f"{r.action} {where} by {r.actor} at {r.at.isoformat()}"


def _changed_since(conn: Connection, before: RolloutRow, action: str, revision: int) -> str:
    """Why a change decided at ``revision`` is not made at ``before.revision``, naming what changed."""
    look = "nothing changed: look at the rollout again (dunning rollout status) and decide from where it is"
    now_at = f"{label(before.stage)}{' (held)' if before.held else ''}, revision {before.revision}"
    if revision > before.revision:
        return (f"this {action} was decided at revision {revision}, which the rollout has not had: it is at "
                f"{now_at}; {look}")
    rows = conn.exec_driver_sql(
        "SELECT at, action, from_stage, to_stage, actor FROM rollout_history WHERE revision > %(r)s ORDER BY id",
        {"r": revision}).fetchall()
    shown = "; ".join(_step(r) for r in rows[-5:])
    since = (f" ({'...; ' if len(rows) > 5 else ''}{shown})" if rows else "")
    if before.stage_revision <= revision:  # the same visit: held, resumed or named meanwhile
        return (f"the rollout changed since revision {revision} this {action} was decided at{since}: it is at "
                f"{now_at}; {look}")
    if not rows:  # its history is gone: what changed cannot be said, only that something did
        return (f"the rollout changed since revision {revision} this {action} was decided at: it is at {now_at}, "
                f"on a visit of {label(before.stage)} begun at {before.stage_entered_at.isoformat()}; {look}")
    decided = rows[0].from_stage
    if decided != before.stage:
        return (f"the rollout is at {label(before.stage)} now, not {label(decided)} as at revision {revision} this "
                f"{action} was decided at{since}; {look}")
    visit = (f"another visit of {label(before.stage)}, begun at {before.stage_entered_at.isoformat()} "
             f"(revision {before.stage_revision}), with a soak and health of its own")
    if any(r.from_stage != r.to_stage for r in rows):
        return (f"the rollout left {label(before.stage)} and came back to it since revision {revision} this {action} "
                f"was decided at{since}: this is {visit}; {look}")
    return (f"the {label(before.stage)} stage started again since revision {revision} this {action} was decided "
            f"at{since}: this is {visit}; {look}")


# Changes that let the rollout widen: decided on an earlier visit of the stage, they skip this one's soak.
WIDENING = ("advance", "resume")


def _left_and_back(conn: Connection, before: RolloutRow, action: str) -> str | None:
    """Why a widening change naming its stage alone cannot be made: the stage was left and come back to,
    so the name does not say which visit it was decided on (None when this is the stage's only visit)."""
    left = conn.exec_driver_sql(
        "SELECT at, action, from_stage, to_stage, actor FROM rollout_history "
        "WHERE from_stage = %(s)s AND to_stage <> %(s)s ORDER BY id DESC LIMIT 1", {"s": before.stage}).first()
    if left is None:
        return None
    back = conn.exec_driver_sql(
        "SELECT at, action, from_stage, to_stage, actor FROM rollout_history "
        "WHERE to_stage = %(s)s AND from_stage <> %(s)s ORDER BY id DESC LIMIT 1", {"s": before.stage}).first()
    came_back = f"; {_step(back)}" if back is not None else ""
    return (f"the rollout left {label(before.stage)} and came back to it ({_step(left)}{came_back}): the stage "
            f"alone does not say which visit of {label(before.stage)} this {action} was decided on, and one decided "
            f"on the earlier visit would skip the soak of this one (begun at {before.stage_entered_at.isoformat()}); "
            f"nothing changed: look at the rollout again (dunning rollout status) and, if you decided on this visit, "
            f"give its revision too: --revision {before.revision} "
            f"(\"revision\": {before.revision} in POST /ops/rollout)")


def _new_health(conn: Connection) -> None:
    """The stage starts its health afresh: every sweep error so far is the one before's (a sweep
    running across the change brings none of it in, even one stamped just after the change's clock
    read). A page writing its errors holds the rollout row shared (sweep.py): they are committed
    before this marks them, or written after it as the stage before's."""
    conn.exec_driver_sql("UPDATE sweep_error SET before_stage = true WHERE NOT before_stage")
    conn.exec_driver_sql("UPDATE sweep_run SET errors_before_stage = errors WHERE errors <> errors_before_stage")


def change(conn: Connection, action: str, actor: str | None, reason: str | None, now: datetime,
           health: dict[str, Any] | None = None, requested_by: str | None = None,
           from_stage: str | None = None, revision: int | None = None) -> tuple[RolloutRow, RolloutRow]:
    """Apply an operator's (or the gate's) action. -> (before, after). Raises RolloutInputError for
    bad input, RolloutError for a change the current state does not allow.

    ``from_stage`` is the stage the change was decided from (compare-and-set under the row lock):
    when the rollout is at another stage by the time the change holds the row (the gate, or another
    operator, changed it meanwhile), nothing changes and RolloutError (409) says so. An advance must
    give it: two advances decided from the same stage (an operator's and the gate's, or two
    operators') otherwise widened the rollout two stages, skipping the soak of the one between.

    ``revision`` is the rollout's revision the change was decided at (as status shows it; the gate's
    decisions carry it): when anything changed since (above all, the stage was left and come back
    to: another visit, whose soak an advance decided on the earlier one would skip), nothing changes
    and RolloutError says what changed. A widening change (advance, resume) that gives its stage
    alone is refused once that stage has been left and come back to: its name no longer says which
    visit it was decided on, and the error gives the revision to add.

    ``actor`` is who made the change as far as the system knows (the authenticated principal);
    ``requested_by``, when given, is a name the caller stated for itself, kept in the audit_log
    row's detail beside it and never in its place.

    advance: next stage now (an operator's advance does not wait for the soak), clears a hold.
    rollback: previous stage, and held so the gate does not widen again until someone resumes.
    hold: stay, the gate stops advancing. resume: the gate may advance again.
    A new stage starts its health afresh: the sweep errors so far are marked before_stage (and each
    sweep's count so far kept in sweep_run.errors_before_stage, for its record).
    """
    if action not in ACTIONS:
        raise RolloutInputError(f"action must be one of {', '.join(ACTIONS)}")
    actor = _required(actor, "actor")
    reason = _required(reason, "a reason")
    expected = None if from_stage is None else parse_stage(from_stage)
    decided_at = None if revision is None else parse_revision(revision)
    if action == "advance" and expected is None:
        raise RolloutInputError("an advance must say the stage it was decided from (from_stage, or --from "
                                "on the command line), so that two advances from one stage widen it once")
    before = read_state(conn, for_update=True)
    _check_decided(conn, before, action, expected, decided_at)
    if decided_at is None and expected is not None and action in WIDENING:
        refused = _left_and_back(conn, before, action)
        if refused is not None:
            raise RolloutError(refused)
    stage, held, entered = before.stage, before.held, before.stage_entered_at
    if action == "advance":
        target = next_stage(stage)
        if target is None:
            raise RolloutError("already at 100%: nothing to advance to")
        stage, held, entered = target, False, now
    elif action == "rollback":
        target = previous_stage(stage)
        if target is None:
            raise RolloutError("remediation is already off: nothing to roll back")
        stage, held, entered = target, True, now
    elif action == "hold":
        if held:
            raise RolloutError(f"already held at {label(stage)}")
        held = True
    else:
        if not held:
            raise RolloutError(f"not held: the gate is already running at {label(stage)}")
        held = False
    made = int(conn.exec_driver_sql(
        "UPDATE rollout_state SET stage = %(stage)s, held = %(held)s, stage_entered_at = %(entered)s, "
        "updated_at = %(now)s, revision = revision + 1, "
        "stage_revision = CASE WHEN %(new_visit)s THEN revision + 1 ELSE stage_revision END WHERE id = 1 "
        "RETURNING revision",
        {"stage": stage, "held": held, "entered": entered, "now": now, "new_visit": stage != before.stage},
    ).scalar_one())
    if stage != before.stage:
        _new_health(conn)
    _audit(conn, action, before.stage, stage, actor, reason, now, health, requested_by, made)
    return before, read_state(conn)


def _check_decided(conn: Connection, before: RolloutRow, action: str, expected: str | None,
                   decided_at: int | None) -> None:
    """RolloutError when the rollout (``before``, read under the row lock) is no longer where the change
    was decided: at another stage than ``expected``, or at another revision than ``decided_at``."""
    if expected is not None and before.stage != expected:
        raise RolloutError(f"the rollout is at {label(before.stage)} now, not {label(expected)} as this {action} "
                           f"was decided from{_last_change(conn)}; nothing changed: look at the rollout again "
                           "and decide from where it is")
    if decided_at is not None and decided_at != before.revision:
        raise RolloutError(_changed_since(conn, before, action, decided_at))


def set_named_accounts(conn: Connection, accounts: list[str], actor: str | None, reason: str | None,
                       now: datetime, requested_by: str | None = None, from_stage: str | None = None,
                       revision: int | None = None) -> RolloutRow:
    """Set the named accounts (the whole list). ``from_stage`` and ``revision``, when given, are where
    the naming was decided (as for ``change``): when the rollout is at another stage, or at another
    revision, by the time the naming holds the row (the gate widened to 5% meanwhile, another operator
    named other accounts), nothing changes and RolloutError (409) says what changed."""
    actor = _required(actor, "actor")
    reason = _required(reason, "a reason")
    expected = None if from_stage is None else parse_stage(from_stage)
    decided_at = None if revision is None else parse_revision(revision)
    cleaned = sorted({a.strip() for a in accounts if a.strip()})
    before = read_state(conn, for_update=True)
    _check_decided(conn, before, "naming", expected, decided_at)
    # At the named stage, naming an account not named before is new exposure: the stage starts again,
    # soak and health with it. Else the soak run without it, and the sweeps that ran then, let the
    # gate widen to 5% at its next check after the naming, the new accounts remediated for minutes.
    # Naming the first accounts (the stage with nobody named has tested nothing; the gate holds it
    # there) is one case of it. The same accounts again, or only some of them taken out, expose no
    # one new: what soaked so far still vouches for those left, and the soak goes on. At a percentage
    # stage the named accounts are a handful beside the share: naming more does not restart it.
    added = sorted(set(cleaned) - set(before.named_accounts))
    removed = sorted(set(before.named_accounts) - set(cleaned))
    starts = before.stage == "named" and bool(added)
    made = int(conn.exec_driver_sql(
        "UPDATE rollout_state SET named_accounts = %(named)s, updated_at = %(now)s, revision = revision + 1, "
        "stage_entered_at = CASE WHEN %(starts)s THEN %(now)s ELSE stage_entered_at END, "
        "stage_revision = CASE WHEN %(starts)s THEN revision + 1 ELSE stage_revision END WHERE id = 1 "
        "RETURNING revision",
        {"named": Json(cleaned), "now": now, "starts": starts}).scalar_one())
    detail: dict[str, Any] = {"named_accounts": cleaned, "before": list(before.named_accounts),
                              "added": added, "removed": removed}
    if starts:
        _new_health(conn)
        detail["stage_entered_at"] = now.isoformat()
    _audit(conn, "name_accounts", before.stage, before.stage, actor, reason, now, detail, requested_by, made)
    return read_state(conn)


def missing_accounts(conn: Connection, accounts: Collection[str]) -> list[str]:
    """The ids among ``accounts`` with no subs_account row (a typo, an account deleted), sorted.
    Named, they are remediated no one: the gate does not take the named stage's quiet for health."""
    if not accounts:
        return []
    rows = conn.exec_driver_sql(
        "SELECT n.id FROM unnest(%(ids)s::text[]) AS n(id) "
        "WHERE NOT EXISTS (SELECT 1 FROM subs_account a WHERE a.account_id = n.id) ORDER BY n.id",
        {"ids": list(accounts)}).fetchall()
    return [r.id for r in rows]


def missing_warning(missing: Collection[str]) -> str:
    """What an operator naming accounts is told about the ones that do not exist (a warning, not a
    refusal: an account may be created later, and is remediated at the named stage from then on)."""
    count = len(missing)
    verb = "account does" if count == 1 else "accounts do"
    return f"{count} named {verb} not exist (no subs_account row): {shortlist(missing)}"


def record_gate(conn: Connection, action: str, reason: str, now: datetime) -> None:
    conn.exec_driver_sql(
        "UPDATE rollout_state SET last_gate_at = %(now)s, last_gate_action = %(action)s, "
        "last_gate_reason = %(reason)s WHERE id = 1",
        {"now": now, "action": action, "reason": reason},
    )


def _audit(conn: Connection, action: str, from_stage: str, to_stage: str, actor: str, reason: str, now: datetime,
           health: dict[str, Any] | None, requested_by: str | None = None, revision: int | None = None) -> None:
    detail: dict[str, Any] = {"from_stage": from_stage, "to_stage": to_stage, "reason": reason,
                              "revision": revision}
    if requested_by is not None:
        detail["requested_by"] = requested_by
    conn.exec_driver_sql(
        "INSERT INTO rollout_history (at, action, from_stage, to_stage, actor, reason, health, revision) "
        "VALUES (%(now)s, %(action)s, %(from)s, %(to)s, %(actor)s, %(reason)s, %(health)s, %(revision)s)",
        {"now": now, "action": action, "from": from_stage, "to": to_stage, "actor": actor, "reason": reason,
         "health": Json(health or {}), "revision": revision},
    )
    conn.exec_driver_sql(
        "INSERT INTO audit_log (at, actor, action, detail) VALUES (%(now)s, %(actor)s, %(action)s, %(detail)s)",
        {"now": now, "actor": actor, "action": f"rollout.{action}",
         "detail": Json(detail)},
    )
