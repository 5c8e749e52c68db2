# WHAGO campaigns. `make run` brings the whole stack up; `make test` runs the suite.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
BUF := node_modules/.bin/buf
export PYTHONPATH := $(CURDIR):$(CURDIR)/clients
PROTOS := $(shell find protos -name '*.proto')
TS := clients/typescript
TS_SRC := $(shell find $(TS)/src $(TS)/test $(TS)/examples -name '*.ts' -not -path '$(TS)/src/gen/*' 2>/dev/null)

.PHONY: all setup gen ts lint test run bench fuzz clean help

all: setup

help:
	@echo "make run    - whole stack on local defaults + demo campaign"
	@echo "make test   - full test suite (real PostgreSQL, Redis, worker, WAHA sandbox)"
	@echo "make lint   - buf lint + buf breaking + ruff + mypy (+ tsc of clients/typescript)"
	@echo "make ts     - build the TypeScript client (buf generate + tsc)"
	@echo "make bench  - benchmarks, writes bench/results.json"
	@echo "make fuzz   - the long fuzz profile of every public RPC (WHAGO_FUZZ_EXAMPLES, default 400)"

$(VENV)/.stamp: requirements.lock
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	touch $@

node_modules/.stamp: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The one generation step: protos/ -> whago/ (proto tree = package tree), with mypy stubs.
whago/.stamp: $(VENV)/.stamp $(PROTOS)
	rm -rf whago
	PATH=$(CURDIR)/$(BIN):$$PATH $(PYTHON) -m grpc_tools.protoc -Iprotos \
		--python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. $(PROTOS)
	find whago -type d -exec touch {}/__init__.py \;
	touch $@

# The TypeScript client: its own pinned dependencies (clients/typescript/package-lock.json), then
# protos/ -> src/gen/ (buf generate, protoc-gen-es; generated, never edited) and tsc -> dist/.
$(TS)/node_modules/.stamp: $(TS)/package.json $(TS)/package-lock.json
	cd $(TS) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(TS)/dist/.stamp: $(TS)/node_modules/.stamp $(PROTOS) $(TS)/buf.gen.yaml $(TS)/tsconfig.json $(TS_SRC)
	cd $(TS) && npm run --silent build
	touch $@

setup: $(VENV)/.stamp whago/.stamp

gen: whago/.stamp

ts: $(TS)/dist/.stamp

lint: setup node_modules/.stamp $(TS)/dist/.stamp
	$(BUF) lint
	@if git rev-parse --verify -q main >/dev/null && git cat-file -e main:protos 2>/dev/null; then \
		$(BUF) breaking --against '.git#branch=main'; \
	else echo "buf breaking: no protos on main yet, skipped"; fi
	$(BIN)/ruff check .
	$(BIN)/mypy

test: setup node_modules/.stamp $(TS)/dist/.stamp
	$(PYTHON) -m pytest -q -n 2 --dist worksteal --durations=15

run: setup node_modules/.stamp
	$(PYTHON) -m devstack

# The long fuzz profile (make test runs a short one): examples per RPC, and 8x that for the WAHA receiver.
fuzz: setup node_modules/.stamp
	WHAGO_FUZZ_EXAMPLES=$${WHAGO_FUZZ_EXAMPLES:-400} $(PYTHON) -m pytest -q -s tests/test_fuzz.py

bench: setup
	$(PYTHON) -m bench.run

clean:
	rm -rf whago .run .pytest_cache .mypy_cache $(TS)/dist $(TS)/src/gen
