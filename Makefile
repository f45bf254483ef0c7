# Two entry points for a fresh machine (see README.md):
#   make run   - create .venv, then scan a sample folder with the embedded defaults
#   make test  - create .venv, then lint, type-check and run the whole test suite (the
#                dashboard's browser tests need a Chromium: `make browser` finds or installs one)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The shared corpus sits beside the checkout on the team's machines; elsewhere the small
# sample folder in this repository is scanned.
SCAN_PATH ?= $(if $(wildcard ../shared/corpus/images),../shared/corpus/images,samples)
PYTEST_ARGS ?= -n auto

# The browser tests take Chromium from where tests/browser.py looks (SYNTHSENTRY_CHROMIUM,
# /usr/bin/chromium, Playwright's download). Without one, root on Debian installs the package.
HAVE_CHROMIUM := $(BIN)/python -c 'import sys; sys.path.insert(0, "tests"); \
	from browser import chromium_executable; sys.exit(chromium_executable() is None)'
APT_CHROMIUM := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
NO_CHROMIUM := No Chromium found, so the browser tests will fail: install one with \
	apt-get install chromium, or $(BIN)/playwright install chromium.

.PHONY: run test lint venv browser clean

run: $(VENV)/.installed
	$(BIN)/synthsentry scan $(SCAN_PATH)

test: $(VENV)/.installed lint browser
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

venv: $(VENV)/.installed

browser: $(VENV)/.installed
	@if $(HAVE_CHROMIUM); then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Installing Debian's chromium for the browser tests"; \
		$(APT_CHROMIUM) >/dev/null 2>&1 \
			|| { apt-get update -qq >/dev/null && $(APT_CHROMIUM) >/dev/null; } \
			|| echo "$(NO_CHROMIUM)"; \
	else echo "$(NO_CHROMIUM)"; fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is needed"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) .synthsentry .pytest_cache .mypy_cache .ruff_cache test-artifacts
