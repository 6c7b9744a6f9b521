# `make test` and `make demo` set themselves up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.mfv-installed

.PHONY: setup test test-fast test-recipe demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	# open-flamingo pins torch==2.0.1; its real needs are in pyproject.toml.
	$(PIP) install --quiet --no-deps -c constraints.txt open-flamingo==2.0.1
	@! $(PIP) freeze | grep -i '^nvidia-' || (echo "CUDA wheels were installed; check constraints.txt" && false)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Retrains a shortened model organism (about 20 minutes on 2 cores); not part of `make test`.
test-recipe: $(STAMP)
	$(PY) -m pytest -q -m recipe tests/test_organism.py

demo: $(STAMP)
	$(PY) -m mfv.demo --out runs/demo

bench: $(STAMP)
	$(PY) benchmarks/aie.py --json runs/bench/aie.json

clean:
	rm -rf runs lightning_logs
