# `make dev` and `make test` are all a fresh machine with Python 3.11 and pip needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test test-postgres install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

dev: $(STAMP)
	$(BIN)/smi dev

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The whole suite against a throwaway PostgreSQL 15 (started, and installed when absent, by .ci/start-postgres).
test-postgres: $(STAMP)
	started=$$(bash .ci/start-postgres) && \
	SMI_TEST_POSTGRES_URL=$$(echo "$$started" | head -1) $(BIN)/python -m pytest $(PYTEST_ARGS); \
	status=$$?; eval "$$(echo "$$started" | tail -1)" >/dev/null; exit $$status

clean:
	rm -rf $(VENV) var
