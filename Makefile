# `make dev` and `make test` are all a fresh machine with Python 3.11 and pip needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The locks (Linux x86_64 and aarch64, CPython 3.11): every version pinned, every file's hash.
# requirements-build.lock: pip and the build tools; requirements.lock: what the image runs;
# requirements-dev.lock: that plus the dev and test extras, at the same versions.
LOCKS := requirements-build.lock requirements.lock requirements-dev.lock
PIP_TOOLS := var/pip-tools
PIP_COMPILE = $(PIP_TOOLS)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	--no-emit-index-url --no-emit-find-links $(LOCK_ARGS)

.PHONY: dev test test-fast test-postgres install lock lint clean compile

# The Dockerfile's steps, with the dev and test extras: the build tools, then every locked package
# (hash-checked, built with those tools), then this project from what is installed (--no-index: a
# dependency of pyproject.toml missing from the lock fails here).
$(STAMP): pyproject.toml $(LOCKS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements-build.lock
	$(BIN)/pip install --quiet --require-hashes --no-build-isolation -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-index --no-build-isolation -e '.[dev,test,postgres]'
	touch $(STAMP)

install: $(STAMP)

dev: $(STAMP) compile
	$(BIN)/smi dev

test: $(STAMP) compile
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The workflow sandbox imports workflows/ again for every job: from a .pyc, not compiled from source
# each time, even where PYTHONDONTWRITEBYTECODE is set (compileall writes them regardless).
compile: $(STAMP)
	$(BIN)/python -m compileall -q smi workflows activities api

# The tests marked `fast` (workflow logic with fake activities, activities alone): under a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m fast $(PYTEST_ARGS)

# ruff's checks (pyflakes, bugbear, import order, complexity <= 12, pycodestyle) and its format, over every
# Python file of the repository, then mypy on what ships; pyproject.toml's [tool.ruff] and [tool.mypy] say how.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Rewrites the locks from pyproject.toml and requirements-build.in, keeping the pins that still fit;
# `make lock LOCK_ARGS=--upgrade` moves every package to its newest allowed version. Needs PyPI.
lock:
	test -x $(PIP_TOOLS)/bin/pip-compile || \
	  { $(PYTHON) -m venv $(PIP_TOOLS) && $(PIP_TOOLS)/bin/pip install --quiet 'pip-tools==7.6.2'; }
	$(PIP_COMPILE) -o requirements-build.lock requirements-build.in
	$(PIP_COMPILE) -c requirements-build.lock --extra postgres -o requirements.lock pyproject.toml
	$(PIP_COMPILE) -c requirements-build.lock -c requirements.lock --extra postgres --extra dev --extra test \
	  -o requirements-dev.lock pyproject.toml

# The whole suite against a throwaway PostgreSQL 15 (started, and installed when absent, by .ci/start-postgres).
test-postgres: $(STAMP)
	started=$$(bash .ci/start-postgres) && \
	SMI_TEST_POSTGRES_URL=$$(echo "$$started" | head -1) $(BIN)/python -m pytest $(PYTEST_ARGS); \
	status=$$?; eval "$$(echo "$$started" | tail -1)" >/dev/null; exit $$status

clean:
	rm -rf $(VENV) var
