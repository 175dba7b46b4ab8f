# Two entry points: `make demo` (the main job) and `make test` (lint, types, tests).
# Both create .venv and install the project with its dev extras on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench protos clean browser

demo: $(STAMP) browser
	$(VENV)/bin/grpcbridge demo

test: lint typecheck pytest

lint: $(STAMP)
	$(PY) -m ruff check src tests $(wildcard benchmarks)

typecheck: $(STAMP)
	$(PY) -m mypy

pytest: $(STAMP) browser
	$(PY) -m pytest

# The browser side: the Pyodide runtime (npm, pinned by package-lock.json) and the wheels
# Pyodide installs (build/browser). Without npm the browser tests are skipped, loudly.
node_modules/.package-lock.json: package.json package-lock.json
	if command -v npm >/dev/null; then npm ci --no-audit --no-fund; else echo "npm not found: browser tests will be SKIPPED"; fi

browser: $(STAMP) node_modules/.package-lock.json
	$(PY) scripts/build_browser_bundle.py

bench: $(STAMP)
	$(PY) benchmarks/relay.py

protos: $(STAMP)
	PYTHON=$(PY) scripts/gen_protos.sh

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "grpcbridge needs Python >= 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) build dist node_modules .mypy_cache .pytest_cache .ruff_cache
