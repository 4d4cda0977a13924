# `make test` and `make bench` set everything up on a fresh machine: a .venv with the pinned
# requirements, the extension built (CUDA kernels too wherever torch has CUDA and nvcc exists),
# rebuilt only when csrc/ or setup.py change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.extension-built
CSRC := $(shell find csrc -type f) setup.py
JOBS ?= $(shell nproc)

.PHONY: all deps build test bench repro info lint clean

all: test

$(DEPS_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install -r requirements.txt
	touch $@

deps: $(DEPS_STAMP)

$(BUILD_STAMP): $(DEPS_STAMP) $(CSRC)
	MAX_JOBS=$${MAX_JOBS:-$(JOBS)} $(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

info: build
	$(PY) -m dropreg_ext.info

test: build
	$(PY) -m dropreg_ext.info
	$(PY) -m pytest tests

bench: build
	$(PY) -m bench $(BENCH_ARGS)

# The paper reproduction (PTB language model and Fashion-MNIST MLP), --quick by default.
repro: build
	$(PY) -m bench.repro all $(or $(REPRO_ARGS),--quick)

lint: deps
	$(PY) -m ruff check dropreg_ext triton_kernels tests bench

clean:
	rm -rf build *.egg-info dropreg_ext/_C*.so $(BUILD_STAMP)
