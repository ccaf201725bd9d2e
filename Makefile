# The single entry point: every target creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv run test lint fmt bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev,examples,reload]'
	touch $(STAMP)

run: venv
	$(VENV)/bin/trioserve fastapi_app:app --app-dir examples --host 127.0.0.1 --port 8000

test: venv
	sh scripts/install-nginx.sh
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check trioserve tests examples
	$(VENV)/bin/ruff format --check trioserve
	$(VENV)/bin/mypy trioserve

fmt: venv
	$(VENV)/bin/ruff format trioserve tests examples
	$(VENV)/bin/ruff check --fix trioserve tests examples

# Benchmarks against the peers (bench/bench.py; BENCH_ARGS=--quick for a smoke run).
bench: venv
	$(PY) -m pip install --quiet -e '.[bench]'
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(PY) bench/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
