# Two commands: `make demo` (set up, train, publish, serve, ask) and `make test` (set up, run the suite);
# `make lint` checks style (ruff), the layering (lint-imports) and types (mypy).
# `make demo-serve` serves the demo's store on 127.0.0.1:8765 until Ctrl-C (the playground is at /);
# `make faults` runs the whole fault suite (tests/faults/, minutes) and writes docs/RELIABILITY.md.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
DEMO_STEPS ?= 300
DEMO_PORT ?= 8765
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv demo demo-serve test lint chromium faults bench clean

$(BIN)/hub: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(BIN)/hub

venv: $(BIN)/hub

demo: venv
	SHARED=$(SHARED) DEMO_STEPS=$(DEMO_STEPS) DEMO_PORT=$(DEMO_PORT) PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

demo-serve: venv
	@[ -d .demo/store ] || $(MAKE) demo
	@echo "serving .demo/store: open http://127.0.0.1:$(DEMO_PORT)/ (Ctrl-C stops)"
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh serve

# The browser test (tests/test_playground.py) drives Debian's chromium; install it when it is missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing chromium for the browser test (apt-get)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

test: venv chromium
	$(BIN)/python -m pytest

# Style (ruff), the layering (import-linter, .importlinter: no upward import, no cycle) and types (mypy on the
# packages [tool.mypy] names); configured in pyproject.toml.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

faults: venv
	HUB_FAULTS=1 timeout 600 $(BIN)/python -m pytest tests/test_faults.py tests/faults

clean:
	rm -rf $(VENV) .demo runs
