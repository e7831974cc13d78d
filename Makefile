# The two commands of the README, and the helpers behind them.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test lock clean-state browser

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

setup: $(STAMP)

# Command 1: set up, generate the phantom, version it with DVC, run the flow to a champion.
quickstart: setup
	$(BIN)/nerveseg quickstart

# Headless Chromium (Debian's package) renders the model card in a test; best effort, as it needs
# root and apt: without it that one check skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq chromium >/dev/null; } 2>/dev/null || echo "chromium not installed: the card rendering check will skip"

# Command 2: set up and run the whole test suite (what .ci/run runs). Test modules run in parallel
# processes (pytest-xdist), a module's tests together so its fixtures are built once: most of the
# suite's time is spent waiting on servers and subprocesses, so more workers than cores pays (6 were slower
# than 4); the longest modules start first (tests/conftest.py).
TEST_WORKERS ?= 4
test: setup browser
	$(BIN)/python -m pip check
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Re-resolve the lock from pyproject.toml's pins in a throw-away venv.
lock:
	rm -rf /tmp/nerveseg-lock && $(PY) -m venv /tmp/nerveseg-lock
	/tmp/nerveseg-lock/bin/python -m pip install -q ".[test]"
	{ sed -n '1,3p' requirements.lock; /tmp/nerveseg-lock/bin/python -m pip freeze --exclude-editable \
	  | grep -v '^nerveseg' | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

# Forget local runs (MLflow store and artifacts, Prefect home); data/raw, the git history and dvc-remote/
# stay: the DVC remote may hold the only copy of earlier data versions. `nerveseg backup --out DIR` first
# if the runs matter (docs/operations.md, "Backup and restore").
clean-state:
	rm -rf .prefect mlflow/mlflow.db mlflow/artifacts
	@echo "kept dvc-remote/: it may hold the only copy of earlier data versions (nerveseg backup saves them)"
