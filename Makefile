# bap-engine — the two commands a newcomer needs: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-ts test-fast lint bench soak docs clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml clients/python/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ./clients/python -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with test and dev tools

run: install  ## serve the API on the embedded default (Postgres, subprocess backend, reference engine)
	$(BIN)/bap-engine serve

test: install  ## the whole suite (Docker/Kubernetes tests skip unless their runtime is up)
	$(BIN)/python -m pytest -q
	$(MAKE) test-ts

test-ts: install  ## the TypeScript client (clients/typescript): npm ci, tsc, node --test against a live `bap-engine serve`
	cd clients/typescript && if [ -f package-lock.json ]; then npm ci --no-audit --no-fund; else npm install --no-audit --no-fund; fi
	cd clients/typescript && npm run --silent build && npm run --silent build:test && node --test dist/test/*.test.js

test-fast: install
	$(BIN)/python -m pytest -q tests/unit tests/api

lint: install  ## ruff + mypy + the import contract
	$(BIN)/ruff check src tests bench soak
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: install  ## print the figures the issues ask for
	bash bench/run.sh

soak: install  ## churn 2 replicas on 1 Postgres with engine kills + a Postgres restart, checking invariants (SOAK_SECONDS=300)
	timeout --signal=TERM --kill-after=15 585 $(BIN)/python -m soak

docs: install  ## regenerate the generated doc pages from the code, then build the site into site/ (mkdocs --strict)
	$(BIN)/python scripts/gen_docs.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) .bap-engine .pytest_cache .mypy_cache .ruff_cache
