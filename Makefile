# `make test` and `make demo` set themselves up on a fresh machine, with or without a GPU.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.mfv-installed
# The torch build: cuda where an NVIDIA driver answers, cpu otherwise; override with TORCH=cpu|cuda.
TORCH ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
TORCH_VERSION := $(shell sed -n 's/^torch==//p' constraints.txt)
CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup torch-cpu torch-cuda test test-fast demo installed bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(MAKE) --no-print-directory torch-$(TORCH) PY=$(PY)
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	# open-flamingo pins torch==2.0.1; its real needs are in pyproject.toml (the same command
	# works in any environment after `pip install .`).
	$(PIP) install --quiet --no-deps -c constraints.txt open-flamingo==2.0.1
	# Any import order of lightning / torchmetrics / open_clip works in this venv (mfv/compat.py):
	# a wheel (`pip install .`) ships mfv_compat.pth itself; this editable install cannot.
	$(PY) -c "import mfv.compat as c; c.install_startup_hook()"
ifeq ($(TORCH),cpu)
	@! $(PIP) freeze | grep -i '^nvidia-' || (echo "CUDA wheels were installed into a CPU-only venv" && false)
endif
	touch $(STAMP)

# GPU machines: the public index's torch (CUDA wheels and their nvidia-* packages).
torch-cuda:
	$(PIP) install --quiet torch==$(TORCH_VERSION)

# CPU-only: torch without its CUDA dependencies; a CUDA build found on the index is replaced
# by the CPU build from PyTorch's CPU index, then torch's remaining (CPU) dependencies follow.
torch-cpu:
	$(PIP) install --quiet --no-deps torch==$(TORCH_VERSION)
	$(PY) -c "import importlib.metadata as m, sys; sys.exit('+cpu' not in m.version('torch'))" || \
	  $(PIP) install --quiet --force-reinstall --no-deps --index-url $(CPU_INDEX) torch==$(TORCH_VERSION)
	$(PIP) install --quiet torch==$(TORCH_VERSION)

# Two pytest-xdist workers, each test file on one of them (its module fixtures are built once);
# TEST_WORKERS=0 runs every test in one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

demo: $(STAMP)
	$(PY) -m mfv.demo --out runs/demo

# The documented install from a built wheel in a fresh venv (a temp folder), then `mfv demo`
# in an empty folder; minutes. MFV_TORCH_INDEX= (empty) takes torch from pip's own sources.
installed: $(STAMP)
	PYTHON=$(PY) .ci/installed.sh $(DEMO_OPTIONS)

bench: $(STAMP)
	$(PY) benchmarks/aie.py --json runs/bench/aie.json

clean:
	rm -rf runs lightning_logs
