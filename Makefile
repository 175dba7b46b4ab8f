# Two entry points: `make demo` (the main job) and `make test` (lint, types, tests).
# Both create .venv and install the project with its dev extras on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench protos clean

demo: $(STAMP)
	$(VENV)/bin/grpcbridge demo

test: lint typecheck pytest

lint: $(STAMP)
	$(PY) -m ruff check src tests $(wildcard benchmarks)

typecheck: $(STAMP)
	$(PY) -m mypy

pytest: $(STAMP)
	$(PY) -m pytest

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
	rm -rf $(VENV) build dist .mypy_cache .pytest_cache .ruff_cache
