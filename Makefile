# One entry point for setting up, building, testing and benchmarking (see README.md).
# Every target creates what it needs (venv, torch, build) on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
CUDA_VENV ?= .venv-cuda
CUDA_TORCH_VERSION ?= 2.14.1
CUDA_ARCHS ?= 8.0;9.0a
export MAX_JOBS ?= 2

.PHONY: setup build test test-all emu-tsan bench bench-suite cuda-check clean

$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=70" wheel
	$(PY) -m pip install -q torch==$(TORCH_VERSION) numpy ninja pytest pytest-benchmark safetensors matplotlib
	touch $@

setup: $(VENV)/.installed

# CPU kernels (and CUDA ones when this venv's torch is a CUDA build and nvcc is found).
build: setup
	PLDR_KERNELS_SKIP_CUDA=$${PLDR_KERNELS_SKIP_CUDA:-1} $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m pldr_kernels

# The default test run: CPU kernels, reference, model, harness, and the CUDA device code run
# on the CPU through tools/cuda_emu. CUDA-device tests skip with a reason on machines without a GPU.
test: build
	$(PY) -m pytest -q -ra tests

# The emulated CUDA kernels under ThreadSanitizer (slow; tiny shapes).
emu-tsan: build
	PLDR_EMU_SANITIZE=thread $(PY) -m pytest -q -m emulation tests

bench: build
	$(PY) -m pldr_kernels.bench --quick

bench-suite: build
	$(PY) -m pytest -q benchmarks --benchmark-only

# Real nvcc build of the CUDA kernels (sm_80 + sm_90a) against a CUDA build of torch, in a copy of
# the tree so the CPU build here is untouched; fails on a compile/link error or a register spill.
cuda-check:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q "setuptools>=70" wheel ninja numpy torch==$(CUDA_TORCH_VERSION)
	rm -rf build/cuda-src && mkdir -p build/cuda-src
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t build/cuda-src
	cd build/cuda-src && CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} PATH=$${CUDA_HOME:-/usr/local/cuda}/bin:$$PATH PLDR_KERNELS_FORCE_CUDA=1 PLDR_KERNELS_PTXAS_VERBOSE=1 \
	  TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" $(abspath $(CUDA_VENV))/bin/python setup.py -q build_ext --inplace \
	  > ../cuda-build.log 2>&1 || (tail -60 ../cuda-build.log; exit 1)
	$(PYTHON) tools/check_ptxas.py build/cuda-build.log
	cd build/cuda-src && $(abspath $(CUDA_VENV))/bin/python -c "import pldr_kernels, torch; \
	  from pldr_kernels.__main__ import report; print(report())"

clean:
	rm -rf build *.egg-info pldr_kernels/_C*.so pldr_kernels/_build_info.py
