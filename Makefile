# bs_keras developer targets.  Everything runs inside ./.venv, which `make venv`
# creates on first use; re-runs are no-ops until setup.cfg/pyproject.toml change.

PYTHON      ?= python3
VENV        := .venv
VPY         := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
DATASET_DIR := /usr/share/datasets/fashion-mnist
DATASET_PKG := dataset-fashion-mnist
# pytest-xdist workers for `make test` (0: one process). Two fit these 2-core
# machines (three: 837 s against 767 s). --dist worksteal: tests/conftest.py
# puts the slow tests first, and xdist's default hands each worker a
# consecutive chunk, so one worker got them all (986 s); stealing: 665 s.
TEST_WORKERS ?= 2

.PHONY: venv test test-all test-heavy test-fast demo bench

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -e '.[dev,export]'
	touch $@

# The whole suite. Needs neither the Debian package $(DATASET_PKG) nor the
# network: tests/conftest.py generates a synthetic Fashion-MNIST for the session
# (the few tests of the real files skip without the package; .ci/run installs it).
# The suite without the heavy end-to-end tests (whole train.py/export runs of
# >= ~30 s each: deep ResNets, the README and Cityscapes walk-throughs, ...).
test: venv
	$(VPY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not heavy"

# Only the heavy tests: CI runs them after `make test` (.ci/run).
test-heavy: venv
	$(VPY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m heavy

# Everything in one run (737 s here).
test-all: venv
	$(VPY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# Inner loop: everything but the tests marked slow (train.py subprocesses,
# ResNet-50/101/152 tracing, exports and conversions, in-process fits; each
# >= ~5 s on 2 busy cores). 119 s here (2026-12-05; `make test` 466 s, `make test-all`
# 737 s).
test-fast: venv
	$(VPY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow"

demo: venv
	@if [ ! -d $(DATASET_DIR) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "Installing Debian package $(DATASET_PKG) ..."; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y $(DATASET_PKG) || \
	      { DEBIAN_FRONTEND=noninteractive apt-get update && \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y $(DATASET_PKG); }; \
	  else \
	    echo "note: $(DATASET_DIR) is missing. Install the Debian package" \
	         "$(DATASET_PKG) (as root: apt-get install $(DATASET_PKG))."; \
	  fi; \
	fi
	$(VPY) train.py

bench: venv
	$(VPY) bench/gate_overhead.py
