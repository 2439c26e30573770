"""``dunning history prune [--dry-run] [--json]``: what beat's tasks.prune_history does, now, to the end."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from app.history.prune import PruneReport


def cmd_history_prune(args: argparse.Namespace) -> int:
    from app.cli import BUSY, cli_runtime
    from app.history.prune import check_retention, count_due, prune

    rt = cli_runtime()
    days = rt.settings.history_retention_days
    check_retention(days, rt.policy)  # a ConfigError: the command says why and exits 2
    report = count_due(rt.engine, rt.policy, days) if args.dry_run else prune(rt.engine, rt.policy, days)
    if report.skipped:
        print(f"not pruned: {report.skipped}", file=sys.stderr)
        return BUSY
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    _print(report)
    return 0


def _print(report: PruneReport) -> None:
    cutoffs = report.cutoffs
    verb = "would remove (dry run, nothing removed)" if report.dry_run else "removed"
    print(f"history older than {report.retention_days} days (before {cutoffs.history.isoformat()}): {verb}")
    if cutoffs.gate != cutoffs.history:
        print(f"  (sweep_error, drift_record, sweep_run: before {cutoffs.gate.isoformat()}, "
              "the rollout gate's health window)")
    width = max(len(table) for table in report.removed)
    for table, count in report.removed.items():
        print(f"  {table:<{width}}  {count}")


def add_commands(sub: Any) -> None:
    history = sub.add_parser("history", help="history rows kept for HISTORY_RETENTION_DAYS")
    hsub = history.add_subparsers(dest="history_command", required=True)
    pruning = hsub.add_parser("prune", help="remove the history rows older than HISTORY_RETENTION_DAYS that "
                                            "nothing reads any more, and print how many per table")
    pruning.add_argument("--dry-run", action="store_true", help="count them only: remove nothing")
    pruning.add_argument("--json", action="store_true")
    pruning.set_defaults(handler=cmd_history_prune)
