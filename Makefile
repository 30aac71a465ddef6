# make demo  -- install, build the demo world (cached), unlearn with negate_repair (the shipped method closest to the twin), evaluate, audit (relearning, quantization), print the report path
# make test  -- install, run the unit, distributed (2 CPU ranks) and GPU (skipped without CUDA) tests
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

# CPU machines: DeepSpeed's CPU accelerator over gloo on loopback. A GPU machine keeps DeepSpeed's own choice.
ifeq ($(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu),)
export DS_ACCELERATOR ?= cpu
endif
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export GLOO_SOCKET_IFNAME ?= lo
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export PYTHONUNBUFFERED := 1
# Launchers the tests start (deepspeed, mpirun.sh's python) come from the venv even when it is not activated.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install mpi demo test test-unit test-dist clean

install: $(STAMP)

$(STAMP): setup.py .ci/constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -c .ci/constraints.txt -e ".[dev]"
	@touch $(STAMP)

# Open MPI for the mpirun route (tests skip it, with the reason, when this cannot install it).
mpi: install
	@if ! command -v mpirun >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      libopenmpi-dev openmpi-bin >/dev/null) || echo "note: could not install Open MPI; mpirun tests will skip"; \
	  else echo "note: mpirun missing and not root; mpirun tests will skip"; fi; fi
	@if command -v mpicc >/dev/null 2>&1; then $(PY) -c "import mpi4py" 2>/dev/null || \
	  $(PIP) install -q -c .ci/constraints.txt mpi4py || echo "note: mpi4py did not build; MPI-discovery route untested"; fi

demo: install
	@# apt-get download needs package lists; a fresh Debian machine has none until the first update.
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; \
	  then apt-get update -qq || true; fi
	$(PY) -m dsunlearn demo

# The unit tests are one process each (OMP_NUM_THREADS=1): two at a time, one per core, whole files per worker so that
# module fixtures are built once. The distributed tests start 2 ranks each: one at a time. Both parts always run.
test: mpi
	@rc=0; $(PY) -m pytest -q -n 2 --dist loadfile tests/unit || rc=1; \
	  $(PY) -m pytest -q tests/dist tests/gpu || rc=1; exit $$rc

test-unit: install
	$(PY) -m pytest -q -n 2 --dist loadfile tests/unit

test-dist: mpi
	$(PY) -m pytest -q tests/dist

clean:
	rm -rf runs .cache .torch_extensions
