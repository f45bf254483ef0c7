# Two entry points for a fresh machine (see README.md):
#   make run   - create .venv, then scan a sample folder with the embedded defaults
#   make test  - create .venv, then lint, type-check and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The shared corpus sits beside the checkout on the team's machines; elsewhere the small
# sample folder in this repository is scanned.
SCAN_PATH ?= $(if $(wildcard ../shared/corpus/images),../shared/corpus/images,samples)
PYTEST_ARGS ?= -n auto

.PHONY: run test lint venv clean

run: $(VENV)/.installed
	$(BIN)/synthsentry scan $(SCAN_PATH)

test: $(VENV)/.installed lint
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is needed"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) .synthsentry .pytest_cache .mypy_cache .ruff_cache
