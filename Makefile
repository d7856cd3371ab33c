# Nexus: two commands on a fresh machine.
#   make demo        create .venv, install, run the lifecycle flow on the tiny preset (offline)
#   make test        same set-up plus dev tools, then the test suite: the fast tier first, then the rest
#   make test-fast   unit and step-level tests only (a few minutes on 2 cores), while you work
#   make test-nightly the longest end-to-end runs, which `make test` leaves out
#   make lint        ruff on everything, pyright (basic) on nexus_core
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo test test-fast test-nightly lint bench up down clean install install-dev lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/nexus run lifecycle configs/presets/tiny.yaml

FAST := not integration and not slow

test-fast: install-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "$(FAST)"

test: test-fast
	$(BIN)/python -m pytest -q -m "not ($(FAST)) and not nightly"

# The longest end-to-end runs (make up, deploy, run, down: about 2.5 minutes), kept out of `make test`
# so CI stays under its 30 minutes; run before a release or when touching deployments or `make up`.
test-nightly: install-dev
	$(BIN)/python -m pytest -q -m nightly

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/pyright

bench: install
	$(BIN)/python -m bench.orchestration

up: install
	bash deployments/up.sh

down:
	bash deployments/down.sh

clean:
	rm -rf .nexus data/processed

lock: install-dev
	(echo "# Versions tested together (pip freeze). Regenerate: make lock"; \
	 $(BIN)/pip freeze --exclude-editable | grep -v '^-e') > constraints.txt
