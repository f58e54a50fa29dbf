# One entry point for setting up, building, testing and benchmarking (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
export MAX_JOBS ?= 2

.PHONY: setup build test bench clean

$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=70" wheel
	$(PY) -m pip install -q torch==$(TORCH_VERSION) numpy ninja pytest pytest-benchmark safetensors
	touch $@

setup: $(VENV)/.installed

build: setup
	PLDR_KERNELS_SKIP_CUDA=$${PLDR_KERNELS_SKIP_CUDA:-1} $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m pldr_kernels

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) benchmarks/bench_ops_cpu.py

clean:
	rm -rf build *.egg-info pldr_kernels/_C*.so pldr_kernels/_build_info.py
