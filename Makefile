# Everything a newcomer needs: `make demo` runs the offline demo, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test test-slow test-all lint bench install install-dev clean

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

# The default set: tests marked slow are left out (pyproject.toml), CI runs this.
test: install-dev
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest $(PYTEST_ARGS)

# Only the tests marked slow (each covers a path a faster test of `make test` also covers).
test-slow: install-dev
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# Every test, the slow ones included.
test-all: install-dev
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

lint: install-dev
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

bench: install
	$(PY) benchmarks/bench_encode_ask.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
