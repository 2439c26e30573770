"""``dunning outbox list [--blocked] [--account ID] [--limit N] [--json]`` and
``dunning outbox skip ID --actor NAME --reason TEXT [--lifecycle-request]``: the rows the relay has
not delivered, and skipping one that Account Management will never take (app/outbox/operator.py)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from app.log_safety import printable
from app.outbox.operator import NotSkipped, Undelivered

BAD_INPUT = 2
BUSY = 1  # as app.cli.BUSY: nothing was done, the same command later works
MAX_LIMIT = 10_000
MAX_ROW_ID = 2**63 - 1
REASON_SHOWN = 100  # characters of the last answer in the table (--json has all of it)


def _error(message: str, code: int = BAD_INPUT) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _runtime() -> Any:
    from app.cli import cli_runtime

    return cli_runtime()


def cmd_list(args: argparse.Namespace) -> int:
    from app.outbox.operator import counts, undelivered

    limit = _whole(args.limit, 1, MAX_LIMIT)
    if limit is None:
        return _error(f"--limit must be a whole number from 1 to {MAX_LIMIT} (got {args.limit!r})")
    with _runtime().engine.connect() as conn:
        rows = undelivered(conn, args.blocked, args.account, limit)
        total, blocked = counts(conn, args.account)
    if args.json:
        # The counts beside the rows: --limit shows the oldest only.
        print(json.dumps({"undelivered": total, "blocked": blocked, "rows": [r.to_json() for r in rows]}, indent=2))
        return 0
    print(f"undelivered: {total} rows, {blocked} blocked (refused as wrong by Account Management)")
    if rows:
        now = datetime.now(UTC)
        print(f"{'ID':<10} {'ACCOUNT':<28} {'EVENT':<24} {'VERSION':>7} {'ATTEMPTS':>8} {'LAST':>4} {'AGE':>8}  "
              "LAST ANSWER")
        for row in rows:
            print(_line(row, now))
    if blocked:
        print("skip a blocked row with: dunning outbox skip ID --actor NAME --reason TEXT")
    return 0


def _line(row: Undelivered, now: datetime) -> str:
    last = str(row.last_status) if row.last_status is not None else "-"
    answer = printable((row.last_error or ("not tried yet" if row.attempts == 0 else "-"))[:REASON_SHOWN])
    if row.blocked_at is not None:
        answer = f"[blocked {age(now - row.blocked_at)}] {answer}"
    return (f"{row.id:<10} {printable(row.account_id):<28} {printable(row.event_type):<24} "
            f"{row.dunning_version:>7} {row.attempts:>8} {last:>4} {age(now - row.created_at):>8}  {answer}")


def age(elapsed: timedelta) -> str:
    """Two units at most: 45s, 12m 3s, 3h 5m, 2d 4h."""
    seconds = max(int(elapsed.total_seconds()), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {seconds}s"
    return f"{seconds}s"


def cmd_skip(args: argparse.Namespace) -> int:
    from app.outbox.operator import required, skip

    if args.id is None:
        return _error("the id of the outbox row to skip is required (see `dunning outbox list`)")
    row_id = _whole(args.id, 1, MAX_ROW_ID)
    if row_id is None:
        return _error(f"{args.id!r} is not an outbox row id (a whole number, see `dunning outbox list`)")
    try:
        actor = required(args.actor, "--actor NAME")
        reason = required(args.reason, "--reason TEXT")
        done = skip(_runtime().engine, row_id, actor, reason, datetime.now(UTC), args.lifecycle_request)
    except NotSkipped as exc:
        return _error(str(exc), BUSY if exc.busy else BAD_INPUT)
    row = done.row
    print(f"skipped outbox row {row.id} ({row.event_type} v{row.dunning_version} for account "
          f"{printable(row.account_id)}, "
          f"last answer {row.last_status or '-'}); recorded by {printable(actor)}")
    if done.consequence is not None:
        print(f"{done.consequence} by dunning: Account Management's subscription-lifecycle workflow must see to it")
    print(f"the account's later rows ({done.later_rows}) go with the relay's next pass")
    return 0


def _whole(text: str, low: int, high: int) -> int | None:
    try:
        value = int(text)
    except ValueError:
        return None
    return value if low <= value <= high else None


def add_commands(sub: Any) -> None:
    outbox = sub.add_parser("outbox", help="domain events the relay has not delivered to Account Management")
    osub = outbox.add_subparsers(dest="outbox_command", required=True)
    listing = osub.add_parser("list", help="undelivered rows, oldest first: attempts, last answer, age, blocked")
    listing.add_argument("--blocked", action="store_true",
                         help="only rows Account Management refused as wrong "
                              "(a 4xx other than 408/409/425/429, or a 409 for over 1 h)")
    listing.add_argument("--account", default=None, help="only this account's rows")
    listing.add_argument("--limit", default="50", help="how many rows to show (50)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_list)
    skipping = osub.add_parser("skip", help="mark one undelivered row skipped (kept, audited): the account's "
                               "later rows then go")
    skipping.add_argument("id", nargs="?", default=None, help="the row's id (dunning outbox list)")
    skipping.add_argument("--actor", default=None, help="who skips it (required, audited)")
    skipping.add_argument("--reason", default=None, help="why (required, audited)")
    skipping.add_argument("--lifecycle-request", action="store_true",
                          help="required to skip a cancellation or upgrade revert the account still asks for: "
                               "dunning then never cancels the subscription (reverts the upgrade)")
    skipping.set_defaults(handler=cmd_skip)
