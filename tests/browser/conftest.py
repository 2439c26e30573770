"""A real headless Chromium (installed by `make browser-deps`) and the Flask app over real HTTP."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

# The distribution's chromium (CI; `make browser-deps` as root on Debian), else the one Playwright
# downloaded (`make browser-deps` anywhere else); CHROMIUM names another.
SYSTEM_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="session")
def live_server(flask_app: Flask) -> Iterator[str]:
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, flask_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def chromium_executable() -> str | None:
    """The Chromium to drive: CHROMIUM, else the system's, else None (Playwright's own)."""
    named = os.environ.get("CHROMIUM")
    if named:
        if not (os.path.exists(named) or shutil.which(named)):
            pytest.fail(f"CHROMIUM={named} does not exist")
        return named
    return SYSTEM_CHROMIUM if os.path.exists(SYSTEM_CHROMIUM) else None


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    executable = chromium_executable()
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        except PlaywrightError as exc:
            if executable is not None:
                raise
            pytest.fail(f"no Chromium: neither {SYSTEM_CHROMIUM} nor Playwright's; run `make browser-deps`\n{exc}")
        try:
            yield chromium
        finally:
            chromium.close()
