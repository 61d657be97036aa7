# bap-engine — the two commands a newcomer needs: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with test and dev tools

run: install  ## serve the API on the embedded default (Postgres, subprocess backend, reference engine)
	$(BIN)/bap-engine serve

test: install  ## the whole suite (Docker/Kubernetes tests skip unless their runtime is up)
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q tests/unit tests/api

lint: install  ## ruff + mypy + the import contract
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: install  ## print the figures the issues ask for
	bash bench/run.sh

clean:
	rm -rf $(VENV) .bap-engine .pytest_cache .mypy_cache .ruff_cache
