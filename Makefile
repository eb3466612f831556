# The two commands a newcomer needs: `make run` and `make test`.
# Both create .venv with a Python >= 3.11 and install what they need.

PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test

.PHONY: run test test-fast lint typecheck clean venv

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "Python 3.11+ is required (none found on PATH)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,embedded]'
	@touch $@

venv: $(STAMP)

# Presence on `projects` lets /demo show who is looking (PRESENCE_CHANNELS overrides it).
# A developer's run migrates its database at start (MIGRATE_ON_START overrides it).
run: $(STAMP)
	PRESENCE_CHANNELS=$${PRESENCE_CHANNELS-projects} MIGRATE_ON_START=$${MIGRATE_ON_START-true} \
		$(BIN)/python -m gateway

lint: $(STAMP)
	$(BIN)/python -m ruff check proto gateway core tests $(wildcard bench) $(wildcard examples)
	$(BIN)/python -m ruff format --check proto gateway core tests $(wildcard bench) $(wildcard examples)

typecheck: $(STAMP)
	$(BIN)/python -m mypy

test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest

# The edit-test loop, under a minute: lint and the tests that need no browser, no deployment
# tools, no gateway processes and no long waits (tests/marks.py says which those are).
FAST_TESTS := not browser and not deploy and not slow and not e2e

test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -q -p no:schemathesis -m "$(FAST_TESTS)"

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache *.egg-info
