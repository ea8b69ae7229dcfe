# Everything a newcomer needs: `make demo` runs the offline demo, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test lint bench install install-dev clean

$(VENV)/.installed: pyproject.toml scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	VENV=$(VENV) bash scripts/install.sh --dev
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/mukv demo

test: install-dev
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

bench: install
	$(PY) benchmarks/bench_encode_ask.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
