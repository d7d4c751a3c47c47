# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXPERIMENT ?= xlsub-demo
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
# `mlflow run --env-manager local` runs the `python` on PATH: make it the venv's
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup browser corpus demo test bench ui mlproject clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

corpus: setup
	$(PY) -m xlsub.corpus

demo: corpus
	mlflow run . --env-manager local --experiment-name $(EXPERIMENT) -P seeds=0,1,2
	$(PY) -m entry_points.summary --experiment $(EXPERIMENT)

# Debian's Chromium drives the real-browser test of the MLflow UI (Playwright uses it; it downloads no browser)
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed (needs root and apt): the browser test will be skipped"

test: setup browser
	$(PY) -m pytest

bench: setup
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# MLproject is generated from the stage dataclasses (a test fails when it is stale)
mlproject: setup
	$(PY) -m entry_points.mlproject

ui: setup
	mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI)

clean:
	rm -rf outputs mlruns mlartifacts .pytest_cache
