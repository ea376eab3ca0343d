# fscs — common tasks. `make help` lists them.
PY      ?= .venv/bin/python
VENV    ?= .venv
export DVC_NO_ANALYTICS := 1
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.DEFAULT_GOAL := help
.PHONY: help setup run repro test test-fast lint format ui flow flow-dask plots bench bench-scale demo
FSCS_REMOTE ?= $(CURDIR)/.cache/dvc-remote

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

setup:  ## create .venv, install fscs with its pinned dependencies (torch from this machine's disk), build the kernel
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	$(VENV)/bin/fscs kernel

run: setup repro  ## set up, then run the default pipeline (MSRC, offline backbone) with dvc repro

repro:  ## run (or bring up to date) the whole DVC pipeline
	$(VENV)/bin/dvc repro

test:  ## run every test, slow ones included (what CI runs)
	$(PY) -m pytest -q

test-fast:  ## run the tests not marked slow
	$(PY) -m pytest -q -m "not slow"

lint:  ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:  ## ruff format + autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

ui:  ## start the Prefect server on 127.0.0.1:4200 and serve the pipeline deployment (Ctrl-C stops both)
	$(PY) -m flows.serve

flow:  ## run the pipeline flow once against the server started by `make ui`
	PREFECT_API_URL=http://127.0.0.1:4200/api $(PY) -m flows.pipeline

flow-dask:  ## run the study on a local Dask cluster (2 workers) under Prefect; data moves through FSCS_REMOTE
	$(PY) -m flows.dask_pipeline --remote $(FSCS_REMOTE) --summary .cache/dask_run.json

plots:  ## render learning curves and the threshold sweep with dvc plots into reports/plots_html/index.html (offline)
	test -f .cache/vega/node_modules/vega-embed/build/vega-embed.min.js || \
	  npm install --silent --no-audit --no-fund --prefix .cache/vega vega@5 vega-lite@5 vega-embed@6
	$(PY) -m fscs.report.plots --node-modules .cache/vega/node_modules --out .cache/vega/offline_template.html
	dvc plots show --html-template .cache/vega/offline_template.html -o reports/plots_html

demo:  ## serve the few-shot demo page on http://127.0.0.1:7860 for the checkpoints in models/cst (Ctrl-C stops)
	$(VENV)/bin/fscs demo --workspace $(CURDIR)

bench:  ## print the extraction, training, attention-kernel and store-checksum benchmarks
	$(PY) -m benchmarks.extract
	$(PY) -m benchmarks.train
	$(PY) -m benchmarks.attention
	$(PY) -m benchmarks.store_checksum
	$(PY) -m benchmarks.demo

bench-scale:  ## paper-scale benchmark: store size, extraction speed, train / evaluate peak RSS flat in N (~20 min)
	$(PY) -m benchmarks.scale --paper
