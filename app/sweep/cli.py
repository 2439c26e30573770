"""``dunning sweep [--dry-run]`` and ``dunning rollout status|advance|hold|rollback|resume|name``."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from app.domain.rollout import label, shortlist
from app.log_safety import printable

if TYPE_CHECKING:
    from app.sweep.sweep import Sweeper, SweepReport


def _runtime() -> Any:
    from app.cli import cli_runtime

    return cli_runtime()


MAX_BATCH_SIZE = 100_000
MAX_COUNT = 100_000


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of accounts, 1 or more (got {text!r})")
    if value > MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_BATCH_SIZE} accounts (got {text})")
    return value


def cmd_sweep(args: argparse.Namespace) -> int:
    from app.sweep.remediate import celery_enqueuer
    from app.sweep.sweep import BATCH_SIZE, SweepBusy, Sweeper, retry_within

    rt = _runtime()
    enqueue = None
    if not args.dry_run:
        from tasks.factory import make_celery

        enqueue = celery_enqueuer(make_celery(rt.settings))
    sweeper = Sweeper(rt.engine, rt.policy, enqueue, dry_run=args.dry_run, batch_size=args.batch_size or BATCH_SIZE,
                      keep=args.show, retry=retry_within(0))
    # SIGTERM (`timeout`, a job past its deadline, a stopped container) ends the sweep as Ctrl-C does:
    # its run is closed 'interrupted'. Killed outright, the run stayed 'running' with a fresh
    # heartbeat, and every sweep was refused as still running until it went stale (15 minutes).
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        report = _sweep(sweeper)
    except SweepBusy as exc:
        print(f"not swept: {exc}", file=sys.stderr)
        return 1
    except Terminated:
        return 128 + signal.SIGTERM  # the shell's status for a program SIGTERM ended
    finally:
        signal.signal(signal.SIGTERM, previous)
    # Errors (compute failures, unreadable rows) fail the command in either output format: scripts
    # read the status, whatever they parse. A remediation the broker refused is no error: deferred,
    # its request waits for beat's re-drive.
    status = 0 if report.errors == 0 else 1
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
        return status
    kind = "dry run (nothing written, nothing enqueued)" if report.dry_run else f"sweep {report.run_id}"
    print(f"{kind} at stage {label(report.stage)} in {report.seconds:.1f}s")
    print(f"scanned {report.scanned}  drifted {report.drifted}  in stage {report.in_stage}  "
          f"out of stage {report.out_of_stage}  guarded {report.guarded}  enqueued {report.enqueued}  "
          f"deferred {report.deferred}  errors {report.errors}  pending {report.pending}")
    if report.drifted_accounts:
        shown = len(report.drifted_accounts)
        print(f"drifted accounts (first {shown} of {report.drifted}):")
        for found in report.drifted_accounts:
            changes = ", ".join(f"{f}: {found['stored'].get(f)!r} -> {found['desired'].get(f)!r}"
                                for f in found["fields"])
            print(f"  {printable(found['account_id'])}  [{found['action']}]  {changes}")
    return status


def _sweep(sweeper: Sweeper, sleep: Callable[[float], None] | None = None) -> SweepReport:
    """The sweep, its failures that pass (the database's connection, lock contention) retried in this
    process as a task's are: after its class's backoff and jitter, reading on from the cursor of the
    last page recorded, while the class's retries in a row last. Interrupted while it waits (Ctrl-C,
    SIGTERM), its run is closed 'interrupted', as during a page."""
    from app.sweep.sweep import SweepRetry, retry_within
    from tasks.failures import POLICIES

    failures = 0
    try:
        return sweeper.start()
    except SweepRetry as exc:
        retry = exc
    while True:
        failures = 0 if retry.progressed else failures
        wait = POLICIES[retry.kind].countdown(failures)
        failures += 1
        print(f"sweep {retry.run_id}: failed ({retry.kind.value}); reading on from its cursor in {wait:.1f}s "
              f"(failure {failures} in a row)", file=sys.stderr)
        try:
            (sleep or time.sleep)(wait)
        except KeyboardInterrupt:
            sweeper.interrupt(retry.run_id)
            raise
        sweeper.retry = retry_within(failures)
        try:
            return sweeper.resume(retry.run_id)
        except SweepRetry as exc:
            retry = exc


class Terminated(KeyboardInterrupt):
    """SIGTERM during a sweep: an interruption, as Ctrl-C (Sweeper closes the run 'interrupted')."""


def _terminate(_signum: int, _frame: object) -> None:
    raise Terminated


def _print_state(state: dict[str, Any], history: list[dict[str, Any]]) -> None:
    held = " (held)" if state["held"] else ""
    print(f"stage: {state['stage_label']}{held} since {state['stage_entered_at']}, revision {state['revision']}")
    print(f"change it from here with: --from {state['stage']} --revision {state['revision']}")
    named = state["named_accounts"]
    print(f"named accounts: {', '.join(printable(a) for a in named) if named else '-'}")
    if state.get("named_accounts_missing"):
        print(f"named accounts that do not exist: {printable(shortlist(state['named_accounts_missing']))}")
    gate = state.get("last_gate")
    if gate:
        print(f"last gate check: {gate['at']}: {gate['action']}: {printable(gate['reason'])}")
    if history:
        print("history (newest first):")
        for h in history:
            print(f"  {h['at']}  {h['action']:<13} {h['from_stage']} -> {h['to_stage']}  "
                  f"by {printable(h['actor'])}: {printable(h['reason'])}")


def cmd_rollout(args: argparse.Namespace) -> int:
    from app.db import unit_of_work
    from app.domain.rollout import health_since, rollout_policy
    from app.rollout import store
    from app.rollout.gate import measure

    rt = _runtime()
    now = datetime.now(UTC)
    action = args.rollout_command
    if action != "status" and not (args.reason or "").strip():
        print("error: --reason TEXT is required: every rollout change is audited with why", file=sys.stderr)
        return 2
    try:
        with unit_of_work(rt.engine) as conn:
            if action == "name":
                after = store.set_named_accounts(conn, args.accounts, args.actor, args.reason, now,
                                                 from_stage=args.from_stage, revision=args.revision)
                print(f"named accounts: {', '.join(map(printable, after.named_accounts)) or '-'}; "
                      f"recorded by {printable(args.actor)}; "
                      f"revision {after.revision}")
                missing = store.missing_accounts(conn, after.named_accounts)
                if missing:  # a warning, not a refusal: an account may be created later
                    print(f"warning: {printable(store.missing_warning(missing))}", file=sys.stderr)
                    if len(missing) == len(after.named_accounts) and after.stage in ("off", "named"):
                        print("warning: none of the named accounts exists: the gate holds the named stage "
                              "(it has remediated no one) until one does; advancing from it by hand "
                              "widens to 5% on no evidence", file=sys.stderr)
            elif action != "status":
                before, after = store.change(conn, action, args.actor, args.reason, now, from_stage=args.from_stage,
                                             revision=args.revision)
                print(f"{action}: {label(before.stage)} -> {label(after.stage)}"
                      f"{' (held)' if after.held else ''}; recorded by {printable(args.actor)}; "
                      f"revision {after.revision}")
            state = store.read_state(conn)
            missing_named = store.missing_accounts(conn, state.named_accounts)
            history = store.history(conn, args.history)
            health = measure(conn, health_since(state.status, rollout_policy(rt.policy.extra), now), state.stage,
                             state.stage_revision)
    except store.RolloutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if action == "status":
        if args.json:
            print(json.dumps({**state.to_json(), "named_accounts_missing": missing_named, "health": health.to_json(),
                              "history": history}, indent=2))
            return 0
        _print_state({**state.to_json(), "named_accounts_missing": missing_named}, history)
        h = health.to_json()
        print(f"health since the stage began: {h['remediations']} remediations, {h['reverted']} reverted "
              f"({h['reverted_ratio']:.1%}), {h['errors']} errors, {h['sweeps']} completed sweeps")
    return 0


def _count(raw: str) -> int:
    """A whole number of at least 0 (argparse names the flag when this refuses)."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{raw} is negative")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{raw} is more than {MAX_COUNT}")
    return value


def _revision(raw: str) -> int:
    """A revision as `rollout status` shows it (argparse names the flag when this refuses)."""
    from app.rollout.store import RolloutInputError, parse_revision

    try:
        return parse_revision(raw)
    except RolloutInputError:
        raise argparse.ArgumentTypeError(f"must be the rollout's revision as `dunning rollout status` shows it "
                                         f"(a whole number), got {raw!r}") from None


def add_commands(sub: Any) -> None:
    sweep = sub.add_parser("sweep", help="run one drift sweep now and print what it found and enqueued")
    sweep.add_argument("--dry-run", action="store_true", help="find drift only: write nothing, enqueue nothing")
    sweep.add_argument("--batch-size", type=_positive, default=None, help="accounts per page")
    sweep.add_argument("--show", type=_count, default=20, help="how many drifted accounts to list")
    sweep.add_argument("--json", action="store_true")
    sweep.set_defaults(handler=cmd_sweep)

    rollout = sub.add_parser("rollout", help="staged remediation rollout: see and steer it")
    rsub = rollout.add_subparsers(dest="rollout_command", required=True)
    status = rsub.add_parser("status", help="stage, hold, last gate decision, health and history")
    status.add_argument("--json", action="store_true")
    status.add_argument("--history", type=_count, default=10, help="how many history entries to show")
    status.set_defaults(handler=cmd_rollout, reason=None)
    helps = {"advance": "widen to the next stage now (does not wait for the soak time)",
             "hold": "stop the gate from advancing", "rollback": "step back one stage (and hold)",
             "resume": "let the gate advance again"}
    for name, text in helps.items():
        p = rsub.add_parser(name, help=text)
        p.add_argument("--reason", help="why (required; recorded in the history and the audit log)")
        p.add_argument("--actor", default=_default_actor(), help="who (default: the login name)")
        p.add_argument("--from", dest="from_stage", metavar="STAGE",
                       help="the stage you decided from, as `rollout status` shows it (5, 5%%, named ...): "
                            "nothing changes if the rollout is elsewhere by then" +
                            ("; required" if name == "advance" else ""))
        p.add_argument("--revision", type=_revision, metavar="N",
                       help="the rollout's revision you decided at, as `rollout status` shows it: nothing changes "
                            "if the rollout changed since (the stage left and come back to included)")
        p.set_defaults(handler=cmd_rollout, history=10, json=False)
    named = rsub.add_parser("name", help="set the accounts of the 'named accounts' stage")
    named.add_argument("accounts", nargs="*")
    named.add_argument("--reason")
    named.add_argument("--actor", default=_default_actor())
    named.add_argument("--from", dest="from_stage", metavar="STAGE",
                       help="the stage you decided at, as `rollout status` shows it (named, 5%% ...): nothing "
                            "changes if the rollout is elsewhere by then (the gate widened meanwhile)")
    named.add_argument("--revision", type=_revision, metavar="N",
                       help="the rollout's revision you decided at, as `rollout status` shows it: nothing changes "
                            "if the rollout changed since (another naming included)")
    named.set_defaults(handler=cmd_rollout, history=10, json=False)


def _default_actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli"
