# Two commands: `make demo` (set up, train, publish, serve, ask) and `make test` (set up, run the suite);
# `make faults` runs the whole fault suite (tests/faults/, minutes) and writes docs/RELIABILITY.md.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
DEMO_STEPS ?= 300

.PHONY: venv demo test faults bench clean

$(BIN)/hub: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(BIN)/hub

venv: $(BIN)/hub

demo: venv
	SHARED=$(SHARED) DEMO_STEPS=$(DEMO_STEPS) PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

test: venv
	$(BIN)/python -m pytest

faults: venv
	HUB_FAULTS=1 timeout 600 $(BIN)/python -m pytest tests/test_faults.py tests/faults

clean:
	rm -rf $(VENV) .demo runs
