# stemml: `make book` sets everything up and builds the book; `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; GPU users can set TORCH_SPEC to the build they need.
TORCH_SPEC ?= torch==2.13.0
INSTALLED := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: book test test-all deps-system clean help

help:
	@echo "make book   set up $(VENV), execute every notebook and build book/_build/html"
	@echo "make test   set up, then run the unit, notebook (nbval) and site tests"

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[book,test]"
	touch $@

book: $(INSTALLED)
	$(VENV)/bin/stemml book

# Headless Chromium and its driver for the site tests (Debian/Ubuntu packages).
deps-system:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y chromium chromium-driver; \
	fi

# Each notebook executes once (nbval compares the fresh run with its stored outputs);
# the site test then renders those verified outputs without executing again.
test: $(INSTALLED) deps-system
	$(PY) -m pytest --nbval --nbval-sanitize-with notebooks/sanitize.cfg notebooks tests

# The same plus the slow accuracy cases.
test-all: $(INSTALLED) deps-system
	$(PY) -m pytest --runslow --nbval --nbval-sanitize-with notebooks/sanitize.cfg notebooks tests

clean:
	rm -rf book/_build notebooks/results .pytest_cache
