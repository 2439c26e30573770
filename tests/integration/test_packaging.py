"""The installed package is the whole product, not only the checkout: a wheel built from this tree
holds every file of app/, tasks/ and webhooks/ (the migrations, templates, static files and the
default policy included), and the ``dunning`` command it installs migrates an empty database and
recomputes an account with the policy it ships.

The container image installs the project with ``pip install .`` (deploy/Dockerfile), so a file
left out of the wheel is missing in production while every other test, run on the editable
checkout, still passes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from app.migrate import alembic_config
from tests.integration.processes import ROOT

PACKAGES = ("app", "tasks", "webhooks")


def _run(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """The command's output; fails the test, with what it printed, when the command fails."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of what the image copies: a build in the checkout would reuse its build/."""
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    # With this venv's setuptools (the test extra holds the build requirements): an isolated build
    # would fetch them from the index on every run.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
          "--wheel-dir", str(out), str(tree)])
    (built,) = out.glob("dunning_fleet-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed into a directory of its own; its dependencies come from this venv."""
    target = tmp_path_factory.mktemp("site")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)])
    return target


def _source_files() -> set[str]:
    files = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.add(path.relative_to(ROOT).as_posix())
    return files


def test_the_wheel_holds_every_file_of_the_packages(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        shipped = {name for name in zf.namelist() if name.split("/", 1)[0] in PACKAGES}
    source = _source_files()
    assert {"app/migrations/env.py", "app/migrations/alembic.ini", "app/policy/default.toml"} <= source
    assert source - shipped == set(), "left out of the installed package"


def test_the_installed_dunning_command_migrates_an_empty_database_and_recomputes(
        installed: Path, empty_database: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(installed), "DATABASE_URL": empty_database}
    dunning = str(installed / "bin" / "dunning")
    # Run from elsewhere, so that nothing is imported from the checkout.
    where = _run([sys.executable, "-c", "import app.migrate; print(app.migrate.__file__)"], env=env, cwd=tmp_path)
    assert Path(where.strip()).is_relative_to(installed)

    assert "database upgraded to head" in _run([dunning, "db", "upgrade"], env=env, cwd=tmp_path)
    engine = create_engine(empty_database)
    try:
        with engine.begin() as conn:
            version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one()
            tables = {row[0] for row in conn.exec_driver_sql(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
            # An account as other teams create one, for the recompute below.
            conn.exec_driver_sql("INSERT INTO subs_account (account_id) VALUES ('acct_installed')")
    finally:
        engine.dispose()
    assert version == ScriptDirectory.from_config(alembic_config(empty_database)).get_current_head()
    assert {"subs_account", "subs_customer", "subs_dunning", "stripe_event", "outbox"} <= tables

    # Recomputed by the installed command, with the policy file the package ships.
    summary = json.loads(_run([dunning, "recompute", "acct_installed", "--json"], env=env, cwd=tmp_path))
    assert (summary["account_id"], summary["status"]) == ("acct_installed", "current")
