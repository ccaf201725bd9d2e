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
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check trioserve tests examples
	$(VENV)/bin/ruff format --check trioserve
	$(VENV)/bin/mypy trioserve

fmt: venv
	$(VENV)/bin/ruff format trioserve tests examples
	$(VENV)/bin/ruff check --fix trioserve tests examples

clean:
	rm -rf $(VENV) build *.egg-info
