# dermq developer commands. `make test` and `make run` work on a fresh machine: they create
# .venv, install the project and its Python client (client/) into it (torch and torchvision come
# from pip's local wheels) and run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dermq-installed

.PHONY: install services browser run test lint typecheck bench-model clean

$(STAMP): pyproject.toml client/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check -e ./client
	@touch $(STAMP)

install: $(STAMP)

# Start the machine's PostgreSQL and Redis if they are down, and wait until they answer. Only root or the
# cluster's owner may start PostgreSQL: another user does it through `sudo -n` where that needs no
# password, or is told what to run. dermq logs in to PostgreSQL over its socket as the user make runs
# as, who creates the databases: as root, make creates that role when it is missing (a stock install
# has only postgres).
services:
	@pg_isready -q -h 127.0.0.1 -p 5432 || { \
		read -r version name owner < <(pg_lsclusters -h | awk '$$3 == 5432 { print $$1, $$2, $$5; exit }'); \
		if [ -z "$$name" ]; then echo "PostgreSQL is down, and pg_lsclusters lists no cluster on port 5432: start it, then make again"; exit 1; fi; \
		start="pg_ctlcluster --skip-systemctl-redirect $$version $$name start"; \
		if [ "$$(id -u)" = 0 ] || [ "$$(id -un)" = "$$owner" ]; then echo "starting PostgreSQL"; $$start; \
		elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then echo "starting PostgreSQL (sudo)"; sudo -n $$start; \
		else echo "PostgreSQL is down, and only root or $$owner may start it (sudo asks for a password):" \
			"run sudo pg_ctlcluster $$version $$name start, then make again"; exit 1; fi; }
	@for i in $$(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done; \
		pg_isready -q -h 127.0.0.1 -p 5432 || { echo "PostgreSQL did not start"; exit 1; }
	@psql -d postgres -Atqc 'select 1' >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v runuser >/dev/null; then \
			echo "creating the PostgreSQL role $$(id -un) (the user make runs as)"; \
			runuser -u postgres -- createuser --superuser "$$(id -un)"; \
		fi; psql -d postgres -Atqc 'select 1' >/dev/null || { \
			echo "cannot log in to PostgreSQL as $$(id -un) over its socket: as postgres, run createuser --superuser $$(id -un)"; exit 1; }; }
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || { \
		echo "starting Redis"; redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --dir /tmp --save ""; }
	@for i in $$(seq 1 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 1; done; \
		redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || { echo "Redis did not start"; exit 1; }

# The browser tests (tests/api/test_portal.py, test_audit_console.py) drive Debian's Chromium and its
# chromedriver through Selenium, never a downloaded browser: install them when missing (as root, with apt).
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver; \
	else \
		echo "note: chromium or chromedriver is missing and this is not root: the browser tests will be skipped" \
			"(sudo apt-get install chromium chromium-driver)"; \
	fi

# The whole stack in the foreground (API, worker, beat, Flower); Ctrl-C stops it.
run: $(STAMP) services
	$(PY) -m core.devstack $(RUN_ARGS)

# The suite on three pytest-xdist workers (at most 3), each with databases, Redis databases, a Celery
# worker and a port block of its own; a test that fails there runs again alone (tests/run_suite.sh).
# TEST_WORKERS=1 runs it in one process.
TEST_WORKERS ?= 3
test: $(STAMP) services browser
	tests/run_suite.sh $(PY) $(TEST_WORKERS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

bench-model: $(STAMP)
	$(PY) -m bench.model

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
