# Two commands: `make demo` (set up, train, publish, serve, ask) and `make test` (set up, run the suite);
# `make lint` checks style (ruff), the layering (lint-imports) and types (mypy).
# `make demo-serve` serves the demo's store on 127.0.0.1:8765 until Ctrl-C (the playground is at /);
# `make docs` builds the docs site (docs/ -> site/, mkdocs build --strict); `make wheel-check` builds the wheel and
# sdist and tries the wheel in a fresh venv (train, publish, serve, one request);
# `make faults` runs the whole fault suite (tests/faults/, minutes) and writes docs/RELIABILITY.md; `make test` runs it at a fast setting.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
DEMO_STEPS ?= 300
DEMO_PORT ?= 8765
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv demo demo-serve test lint docs wheel-check chromium java faults bench bench-guidellm lm-eval clean

$(BIN)/hub: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e ".[test,docs]"
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

# METEOR and the PTB tokeniser of ROUGE-L and CIDEr (the E2E metrics) run on Java: without it their tests skip.
java:
	@command -v java >/dev/null 2>&1 || { \
	  echo "installing a headless Java runtime for the E2E metric tests (apt-get)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq default-jre-headless; }

test: venv chromium java
	$(BIN)/python -m pytest

# Style (ruff), the layering (import-linter, .importlinter: no upward import, no cycle) and types (mypy on the
# packages [tool.mypy] names); configured in pyproject.toml.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

# The docs site: every warning (a broken link or anchor included) fails the build.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	@echo "docs site built in site/ (open site/index.html; \`$(BIN)/mkdocs serve\` previews while editing)"

# The package as a user gets it (scripts/wheel_check.sh): python -m build -> dist/ (wheel + sdist), the wheel into a
# fresh venv outside the tree, then hub --version, train 3 steps on the stand-in, publish, serve, one request.
# Minutes, mostly pip installing the dependencies; capped at 20.
wheel-check: venv
	SHARED=$(SHARED) PYTHON=$(BIN)/python timeout 1200 bash scripts/wheel_check.sh

faults: venv
	HUB_FAULTS=1 timeout 600 $(BIN)/python -m pytest tests/test_faults.py tests/faults

# GuideLLM (an outside benchmark client) against `hub serve`, from its own venv (its pins differ from ours; torch
# is the same CPU build) -> docs/guidellm.md
GUIDELLM_VENV := .venv-guidellm
$(GUIDELLM_VENV)/bin/guidellm:
	$(PYTHON) -m venv $(GUIDELLM_VENV)
	$(GUIDELLM_VENV)/bin/pip install --quiet "torch==2.13.0" "guidellm==0.8.1"

bench-guidellm: venv $(GUIDELLM_VENV)/bin/guidellm
	GUIDELLM=$(CURDIR)/$(GUIDELLM_VENV)/bin/guidellm $(BIN)/python -m bench.guidellm_bench --out docs

# lm-evaluation-harness (`lm_eval --model local-completions`) scores tests/fixtures/lm_eval through `hub serve` and
# must match the in-process numbers (tests/test_lm_eval.py); its own venv, as GuideLLM's.
LMEVAL_VENV := .venv-lmeval
$(LMEVAL_VENV)/bin/lm_eval:
	$(PYTHON) -m venv $(LMEVAL_VENV)
	$(LMEVAL_VENV)/bin/pip install --quiet "torch==2.13.0" "lm-eval[api]==0.4.13"

lm-eval: venv $(LMEVAL_VENV)/bin/lm_eval
	LM_EVAL=$(CURDIR)/$(LMEVAL_VENV)/bin/lm_eval $(BIN)/python -m pytest tests/test_lm_eval.py

clean:
	rm -rf $(VENV) $(GUIDELLM_VENV) $(LMEVAL_VENV) .demo runs site dist
