# The single entry point: every target creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv run test test-pure test-compiled lint fmt bench bench-instructions autobahn clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev,examples]'
	touch $(STAMP)

# make run PORT=9000 HOST=0.0.0.0
HOST ?= 127.0.0.1
PORT ?= 8000

run: venv
	$(VENV)/bin/trioserve fastapi_app:app --app-dir examples --host $(HOST) --port $(PORT)

# The whole suite twice: on the pure-Python package (.venv, an editable install), then on
# the mypyc-compiled one (.venv-compiled, rebuilt when a source changes; setup.py). Each run
# checks that it tests the build it names (TRIOSERVE_EXPECT_COMPILED, tests/test_compiled.py).
# The compiled run starts in tests/, so that neither it nor the processes it starts find the
# checkout's trioserve/ on sys.path. PYTEST_ARGS='-k ...' narrows both runs.
PYTEST_ARGS ?= -n 2
COMPILED_VENV := .venv-compiled
COMPILED_PY := $(COMPILED_VENV)/bin/python
COMPILED_STAMP := $(COMPILED_VENV)/.built
SOURCES := $(shell find trioserve -name '*.py') setup.py pyproject.toml

# CI runs both (.ci/run -> make test); `make test-pure` or `make test-compiled` runs one.
test: test-pure test-compiled

test-pure: venv
	sh scripts/install-nginx.sh
	sh scripts/install-chromium.sh
	TRIOSERVE_EXPECT_COMPILED=0 $(PY) -m pytest $(PYTEST_ARGS)

test-compiled: $(COMPILED_STAMP)
	sh scripts/install-nginx.sh
	sh scripts/install-chromium.sh
	cd tests && TRIOSERVE_EXPECT_COMPILED=1 ../$(COMPILED_PY) -m pytest -c ../pyproject.toml \
		--rootdir .. $(PYTEST_ARGS) ../tests ../examples

# The dependencies first (mypyc type-checks against them; installed again only when
# pyproject.toml changes), then the compiled package (setup.py compiles the modules' C
# files on every core at once).
$(COMPILED_VENV)/.deps: pyproject.toml
	test -x $(COMPILED_PY) || $(PYTHON) -m venv $(COMPILED_VENV)
	$(COMPILED_PY) -m pip install --quiet --upgrade pip
	$(COMPILED_PY) -m pip install --quiet 'setuptools>=77' 'mypy>=1.11'
	TRIOSERVE_COMPILE=0 $(COMPILED_PY) -m pip install --quiet --no-build-isolation \
		'.[test,dev,examples]'
	touch $@

$(COMPILED_STAMP): $(COMPILED_VENV)/.deps $(SOURCES)
	TRIOSERVE_COMPILE=1 $(COMPILED_PY) -m pip install --quiet --no-build-isolation \
		--no-deps --force-reinstall .
	touch $@

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
	command -v h2load >/dev/null || (apt-get update -qq && apt-get install -y -qq nghttp2-client)
	$(PY) bench/bench.py $(BENCH_ARGS)

# Instructions per request under valgrind (deterministic; for changes of a few percent on a
# noisy machine): writes bench/RESULTS-instructions.md. About 20 minutes.
bench-instructions: venv
	$(PY) -m pip install --quiet -e '.[bench]'
	command -v valgrind >/dev/null && command -v h2load >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq valgrind nghttp2-client)
	$(PY) bench/bench.py --instructions $(BENCH_ARGS)

# Autobahn|Testsuite's fuzzing client against an echo app (autobahn/run.py). wstest runs only
# on Python 2.7 with old pinned dependencies: they live in their own virtualenv. wsaccel (C
# masking and UTF-8 checks) makes cases 9, 12 and 13 minutes instead of hours.
AUTOBAHN_VENV := .autobahn-venv
PYTHON2 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/2.7*/bin/python2.7) \
	$(shell command -v python2.7 2>/dev/null))
AUTOBAHN_PINS := autobahntestsuite==25.10.1 six==1.16.0 'autobahn[twisted]==0.10.9' \
	Twisted==19.10.0 txaio==2.1.0 unittest2 klein==17.10.0 Werkzeug==1.0.1 jinja2==2.11.3 \
	markupsafe==1.1.1 pyOpenSSL==19.1.0 cryptography==3.3.2 service_identity==18.1.0 \
	zope.interface==4.6.0 incremental==16.10.1 setuptools==44.0.0 wsaccel==0.6.6

$(AUTOBAHN_VENV)/.installed: Makefile
	@test -n "$(PYTHON2)" || { echo "make autobahn needs CPython 2.7 (pyenv install 2.7.18)" \
		"or PYTHON2=/path/to/python2.7"; exit 1; }
	$(PYTHON2) -m pip install --quiet --upgrade --target build/autobahn-virtualenv \
		virtualenv==16.7.12
	PYTHONPATH=build/autobahn-virtualenv $(PYTHON2) -m virtualenv --no-download --quiet \
		$(AUTOBAHN_VENV)
	$(AUTOBAHN_VENV)/bin/pip install --quiet $(AUTOBAHN_PINS)
	touch $@

# AUTOBAHN_ARGS='--cases 1.*,2.*' runs a subset; the report goes to autobahn/reports/.
autobahn: venv $(AUTOBAHN_VENV)/.installed
	$(PY) autobahn/run.py --wstest $(AUTOBAHN_VENV)/bin/wstest $(AUTOBAHN_ARGS)

clean:
	rm -rf $(VENV) $(COMPILED_VENV) $(AUTOBAHN_VENV) build *.egg-info
