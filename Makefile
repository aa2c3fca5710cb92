# One-command set-up: every target creates the virtual environment it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)
UV_VERSION := 0.13.9

.PHONY: install deploy-deps client-deps imap-deps run stack demo test lint format openapi lock rotate-keys clean bench

## The dependencies' bytecode is compiled at install: where .pyc files cannot be written (a
## read-only image, PYTHONDONTWRITEBYTECODE) every process would otherwise compile each module
## it imports, the lazy ones in the middle of its first requests.
$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11 or newer is required"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || \
		{ echo "python3 -m venv failed: on Debian run 'apt-get install python3-venv'"; exit 1; }
	$(BIN)/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

## run: migrate and serve on http://127.0.0.1:8000 (SQLite, development secrets in .abl/)
run: install
	ABL_ENV=$${ABL_ENV:-development} $(BIN)/python -m services.cli serve

## stack: registry, scheduler, two senders and a gateway as separate processes on PostgreSQL and
## RabbitMQ, as production runs them; one base URL on http://127.0.0.1:8000; Ctrl-C stops all
STACK_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/abl
stack: install
	ABL_ENV=$${ABL_ENV:-development} ABL_DATABASE_URL=$${ABL_DATABASE_URL:-$(STACK_DATABASE_URL)} \
		$(BIN)/python -m services.cli ensure-database
	ABL_ENV=$${ABL_ENV:-development} ABL_DATABASE_URL=$${ABL_DATABASE_URL:-$(STACK_DATABASE_URL)} \
		ABL_REGISTRY_URL=http://127.0.0.1:8101 ABL_SCHEDULER_URL=http://127.0.0.1:8102 \
		ABL_WEBHOOKS_URL=http://127.0.0.1:8105 \
		PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/honcho start -f Procfile

## demo: a local SMTP server, a tenant, three servers, 30 emails: 10 leave through each
demo: install
	$(BIN)/python -m services.demo

## deploy-deps: the CRD schemas (kubernetes-models, pinned by package-lock.json) the deploy tests use
CRD_CHECK := deploy/k8s/crd-check
$(CRD_CHECK)/node_modules/.installed: $(CRD_CHECK)/package-lock.json
	@if command -v npm >/dev/null; then \
		npm ci --prefix $(CRD_CHECK) --no-audit --no-fund --loglevel=error && touch $@; \
	else echo "npm not found: the CRD schema test will be skipped (and fail with CI=true)"; fi

deploy-deps: $(CRD_CHECK)/node_modules/.installed

## client-deps: the TypeScript client's generator and compiler (openapi-typescript, openapi-fetch,
## typescript; pinned by package-lock.json) that tests/test_typescript_client.py runs
TS_CLIENT := clients/typescript
$(TS_CLIENT)/node_modules/.installed: $(TS_CLIENT)/package-lock.json
	@if command -v npm >/dev/null; then \
		npm ci --prefix $(TS_CLIENT) --no-audit --no-fund --loglevel=error && touch $@; \
	else echo "npm not found: the TypeScript client test will be skipped (and fail with CI=true)"; fi

client-deps: $(TS_CLIENT)/node_modules/.installed

## imap-deps: Dovecot, the real IMAP server the mailbox tests start (Debian's dovecot-imapd)
imap-deps:
	@test -x /usr/sbin/dovecot || command -v dovecot >/dev/null || \
		if [ "$$(id -u)" = 0 ]; then \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q dovecot-imapd || \
			{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dovecot-imapd; }; \
		else echo "dovecot not found: run 'sudo apt-get install -y dovecot-imapd' (the IMAP tests need it)"; fi

## test: the whole suite; with CI=true, PostgreSQL and RabbitMQ tests fail instead of skipping
test: install deploy-deps client-deps imap-deps
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy shared services tests bench

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## openapi: write the committed OpenAPI spec from the app (a test fails when they differ)
openapi: install
	$(BIN)/python -m services.openapi

## lock: refresh requirements.lock from pyproject.toml
lock:
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

rotate-keys: install
	$(BIN)/python -m services.cli rotate-keys

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

## bench: every benchmark; each prints its figures beside a baseline from the same run
## (small sizes, about 5 minutes; `python -m bench.scheduler_tick --full` for 100k servers / 1M)
bench: install imap-deps
	$(BIN)/python -m bench.encoding
	$(BIN)/python -m bench.registry_check
	$(BIN)/python -m bench.scheduler_tick
	$(BIN)/python -m bench.sender
	$(BIN)/python -m bench.inbox
	$(BIN)/python -m bench.webhooks
	$(BIN)/python -m bench.e2e
