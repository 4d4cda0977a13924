# `make test` and `make bench` set everything up on a fresh machine: a .venv with the pinned
# requirements, the extension built (CUDA kernels too wherever torch has CUDA and nvcc exists),
# rebuilt only when csrc/ or setup.py change. `make test-compat` does the same with the oldest
# supported torch and triton (those of the GPU image) in .compat/, on a copy of the source tree.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.extension-built
CSRC := $(shell find csrc -type f) setup.py
JOBS ?= $(shell nproc)
SDIST_CHECK := .sdist-check

.PHONY: all deps build test test-compat compat-src bench bench-refresh repro info lint sdist-check clean

all: test

$(DEPS_STAMP): requirements.txt requirements-dev.txt
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

# The main benchmark job, into bench/out/<device-tag>/ (not tracked); bench-refresh replaces the
# committed results in bench/results/<device-tag>/ and re-renders bench/results/README.md.
bench: build
	$(PY) -m bench $(BENCH_ARGS)

bench-refresh: build
	$(PY) -m bench --refresh $(BENCH_ARGS)
	$(PY) -m bench.report

# The paper reproduction (PTB language model and Fashion-MNIST MLP), --quick by default; results in
# repro/results/.
repro: build
	$(PY) -m repro all $(or $(REPRO_ARGS),--quick)

# The oldest supported versions. The extension .so has the same file name for both torches, so
# this builds and tests a copy of the tree (.compat/src, refreshed on every run) with its own venv;
# the CUDA kernels are compiled for sm_90 only (what the GPU image builds), the CPU kernels run.
COMPAT := .compat
COMPAT_PY := $(COMPAT)/venv/bin/python
COMPAT_DEPS_STAMP := $(COMPAT)/venv/.deps-installed
COMPAT_BUILD_STAMP := $(COMPAT)/venv/.extension-built

$(COMPAT_DEPS_STAMP): requirements-compat.txt requirements-dev.txt
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT)/venv
	$(COMPAT_PY) -m pip install --upgrade pip setuptools wheel
	$(COMPAT_PY) -m pip install -r requirements-compat.txt
	touch $@

compat-src:
	mkdir -p $(COMPAT)/src
	tar -cf - --exclude=./.git --exclude=./.venv --exclude=./$(COMPAT) --exclude=./$(SDIST_CHECK) --exclude=./build \
	    --exclude='*.so' --exclude='*.egg-info' --exclude=__pycache__ . | tar -xf - -C $(COMPAT)/src

$(COMPAT_BUILD_STAMP): $(COMPAT_DEPS_STAMP) $(CSRC) | compat-src
	cd $(COMPAT)/src && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$${MAX_JOBS:-$(JOBS)} \
	    ../venv/bin/python -m pip install --no-build-isolation --no-deps -e .
	touch $@

test-compat: compat-src $(COMPAT_BUILD_STAMP)
	cd $(COMPAT)/src && ../venv/bin/python -m dropreg_ext.info && ../venv/bin/python -m pytest tests

# ruff over every Python file git does not ignore (config in pyproject.toml).
lint: deps
	$(PY) -m ruff check .

# The source release builds (without torch), installs with --no-build-isolation into a fresh venv
# that reuses .venv's torch (CPU kernels only), imports with its extension loaded, and a build under
# pip's default isolation stops with the message to use --no-build-isolation (.ci/sdist_check.py).
sdist-check: deps
	MAX_JOBS=$${MAX_JOBS:-$(JOBS)} $(PY) .ci/sdist_check.py $(SDIST_CHECK)

clean:
	rm -rf build *.egg-info dropreg_ext/_C*.so $(BUILD_STAMP) $(COMPAT)/src $(COMPAT_BUILD_STAMP) $(SDIST_CHECK)
