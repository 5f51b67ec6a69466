# Two entry points for a fresh machine: `make run` (install + whole pipeline on the built-in
# data) and `make test` (install + the whole test suite). Everything else is a convenience.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
# Ray: no usage stats prompt, no dashboard, quiet start.
export RAY_USAGE_STATS_ENABLED := 0
export RAY_DISABLE_DOCKER_CPU_WARNING := 1

.PHONY: install install-system run standin study test test-fast bench bench-gpu ui report params clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	$(GIT_REPO)
	touch $@

# Into the current Python instead of a venv: the cluster's Ray image (cluster/*.yaml).
install-system:
	python -m pip install -q -r requirements.txt
	python -m pip install -q --no-deps -e .
	$(GIT_REPO)

# DVC needs the project's git repo (a tarball or an export has none).
GIT_REPO = test -d .git || (git init -q && git add -A && git -c user.email=pipeline@localhost -c user.name=pipeline commit -qm "initial import")

# dvc repro with one local Ray for all stages and one MLflow parent run (see pipeline/run.py).
run: install
	$(PY) -m pipeline.run

# Remake the shipped stand-in encoder (encoders/dvc.yaml, about 7 minutes on 2 CPU cores). Its
# stage is frozen so that `make run` never retrains it; it is thawed for this run only, and
# frozen again however the run ends (its outputs persist: a failed run keeps the old weights).
STANDIN := encoders/dvc.yaml:standin_encoder
standin: install
	dvc unfreeze $(STANDIN); trap 'dvc freeze $(STANDIN)' EXIT INT TERM; dvc repro --force $(STANDIN)

# The label-efficiency study (hours on 2 CPU cores; resumable), then its report into README.md.
study: install
	$(PY) -m pipeline.runtime.local_ray -- $(PY) -m pipeline.tools.study
	$(PY) -m pipeline.tools.study readme

# Two pytest workers (pytest-xdist), each taking whole files: the end-to-end pipeline's tests,
# which share one run, stay together and in order; tests/conftest.py hands out the longest first.
test: install
	$(PY) -m pytest -q --durations=15 -n 2 --dist loadfile --no-loadscope-reorder

test-fast: install
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile --no-loadscope-reorder

# The performance benchmark (about 40 minutes here), then its table into README.md. The whole
# pipeline is also timed at BENCH_AGAINST: the last commit of the earlier default (digit scenes,
# the supervised encoder trained inside the pipeline).
BENCH_AGAINST ?= 5973b07
bench: install
	$(PY) -m pipeline.tools.bench --against $(BENCH_AGAINST)
	$(PY) -m pipeline.tools.bench readme

# The benchmark's GPU mode (r50_vit_b16 at 512×512, bf16; needs a CUDA device), then its table.
bench-gpu: install
	$(PY) -m pipeline.tools.bench gpu $(ARGS)
	$(PY) -m pipeline.tools.bench readme

ui: install
	mlflow ui --backend-store-uri "sqlite:///$(abspath mlflow.db)" --host 127.0.0.1 --port 5000

# Every DVC plot of the workspace (curves, per-class IoU, figures) in one HTML page.
report: install
	dvc plots show --out reports/plots
	@echo "open reports/plots/index.html"

# Compose params.yaml from conf/ presets, e.g. `make params ARGS="model=r50_vit_b16"`.
params: install
	$(PY) -m pipeline.compose $(ARGS)

clean:
	rm -rf data models reports ray_results mlflow.db mlartifacts logs .dvc/cache .dvc/tmp
