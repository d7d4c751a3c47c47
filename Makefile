# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXPERIMENT ?= xlsub-demo
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
# Against an http(s) server that is down, MLflow's client retries for minutes before `mlflow run` starts
# anything: give up within 30 s instead (override either for a slow or flaky server)
export MLFLOW_HTTP_REQUEST_MAX_RETRIES ?= 2
export MLFLOW_HTTP_REQUEST_TIMEOUT ?= 10
# `mlflow run --env-manager local` runs the `python` on PATH: make it the venv's
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup browser postgres corpus demo demo-doc test bench ui mlproject gc clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

corpus: setup
	$(PY) -m xlsub.data.corpus

demo: corpus
	mlflow run . --env-manager local --experiment-name $(EXPERIMENT) -P seeds=0,1,2
	$(PY) -m entry_points.summary --experiment $(EXPERIMENT)

# docs/demo.md from the newest demo's verdicts.json (no number on it is copied by hand)
demo-doc: setup
	$(PY) -m entry_points.summary --experiment $(EXPERIMENT) --markdown docs/demo.md

# Debian's Chromium drives the real-browser test of the MLflow UI (Playwright uses it; it downloads no browser)
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed (needs root and apt): the browser test will be skipped"

# Debian's PostgreSQL is the store of the team-server test (tests/test_team_server.py)
postgres:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
		|| echo "postgresql could not be installed (needs root and apt): the team-server test will be skipped"

# two pytest-xdist workers, each on its share of the cores; the tests that share a session's stage runs (and each
# module's own) stay on one worker (tests/conftest.py). TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: setup browser postgres
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

# pooling.py measures a finetuned model (--model); scale.py runs --quick here (the full sizes take longer)
bench: setup
	for b in benchmarks/*.py; do case $$b in *pooling.py) continue;; *scale.py) set -- --quick;; *) set --;; esac; \
		echo "== $$b"; $(PY) $$b "$$@" || exit 1; done

# MLproject and docs/parameters.md are generated from the stage dataclasses (a test fails when either is stale)
mlproject: setup
	$(PY) -m entry_points.mlproject
	$(PY) -m entry_points.docs

ui: setup
	mlflow ui --host 127.0.0.1 --backend-store-uri $(MLFLOW_TRACKING_URI)  # loopback only: the UI has no login

# dead RUNNING runs marked FAILED, local checkpoints of finished runs deleted (docs/deployment.md); GC_ARGS=--dry-run only prints
gc: setup
	$(PY) -m xlsub.tracking.gc $(GC_ARGS)

clean:
	rm -rf outputs mlruns mlartifacts .pytest_cache
