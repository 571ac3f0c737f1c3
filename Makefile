# One entry point for every task: `make run` serves the demo, `make test` runs what CI runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
export HOST PORT

.PHONY: run serve serve-deps test lint venv deps dev-deps system-deps migrate seed clean wheel bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Stamp files make reinstalls happen only when a requirements file changes.
$(VENV)/.deps: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev-deps: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@ $(VENV)/.deps

$(VENV)/.bench-deps: requirements.txt requirements-bench.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-bench.txt
	touch $@ $(VENV)/.deps

venv: $(BIN)/python
deps: $(VENV)/.deps
dev-deps: $(VENV)/.dev-deps

# Debian packages the tests need (a private redis-server; chromium for the browser tests,
# driven by pip's playwright: no browser is downloaded); installed only when missing.
system-deps: serve-deps
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "installing redis-server"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@test -x /usr/bin/chromium || { \
		echo "installing chromium"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

# `make serve` and the deployment tests run nginx (Debian package); installed only when missing.
serve-deps:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
		echo "installing nginx"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; }

migrate: deps
	$(BIN)/python manage.py migrate --noinput

seed: migrate
	$(BIN)/python manage.py seed_demo

run: seed
	@echo "Serving on http://$(HOST):$(PORT)/  (channel layer: $${REDIS_URL:-in-memory})"
	$(BIN)/daphne -b $(HOST) -p $(PORT) project.asgi:application

# The deployed topology on loopback: Redis (unless REDIS_URL), DAPHNES daphne processes and
# nginx on HOST:PORT, from the files in deploy/ (see docs/deployment.md). Ctrl-C stops it all.
DAPHNES ?= 2
serve: deps serve-deps
	@command -v redis-server >/dev/null 2>&1 || test -n "$$REDIS_URL" || $(MAKE) system-deps
	DAPHNES=$(DAPHNES) $(BIN)/python deploy/serve.py

lint: dev-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: dev-deps system-deps lint
	$(BIN)/python -m pytest

# Issue 8's benchmark, realtime against the Channels tutorial pattern (docs/performance.md);
# not part of `make test`. Needs PostgreSQL on 127.0.0.1:5432 (or DATABASE_URL); writes
# results/. The soft file limit is raised to the hard one for thousands of sockets.
bench: system-deps $(VENV)/.bench-deps
	ulimit -n $$(ulimit -Hn) 2>/dev/null || true; $(BIN)/python -m bench

# The distributable wheel in dist/; build/ goes first so that no stale module ships.
wheel: | $(BIN)/python
	rm -rf build
	$(BIN)/python -m pip wheel --quiet --no-deps -w dist .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
