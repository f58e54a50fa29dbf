#!/usr/bin/env bash
# One run on the H200 (docs/design.md §5): install the extension (the wheel `make cuda-check` left in
# .whl/ when it fits this Python, torch and tree; else a build from source), the CUDA tests, the
# Triton kernels' tests, compute-sanitizer (memcheck, racecheck) on one small case, and the GPU
# benchmarks (ops, generate, the training forward + backward of g_attention).
# Every step runs even when an earlier one failed; summary.txt lists each step as passed, FAILED
# or skipped, and the exit status is 0 only when none failed. Leaves summary.txt, the benchmark
# JSON files and logs.tar.gz in OUTDIR (the device tool returns at most 8 files).
#
#   tools/gpu_check.sh OUTDIR             on the GPU machine (device run: carry .whl)
#   tools/gpu_check.sh --dry-run OUTDIR   here, without a GPU (or PLDR_GPU_CHECK_DRY=1): in a copy of
#                                         the tree as the device tool sends it, every step that needs
#                                         no GPU runs for real (wheel check and install, import,
#                                         test collection, the sanitizer case on the CPU, parsing of
#                                         each benchmark command); the GPU steps print
#                                         "skipped: needs a GPU" and the command they would run.
# env: PYTHON (python3; here the py3.12 + torch 2.11 venv: PYTHON=.venv-h200/bin/python),
#      MAX_JOBS (16; 2 in a dry run), QUICK=1 (the benchmarks' --quick; 0: full sweeps),
#      GPU_CHECK_BUILD=1 (build from source even when the wheel fits),
#      GPU_CHECK_BUDGET_S=540 (steps are cut short so that the logs come back inside the device
#      tool's 10-minute limit; a step cut or not started for lack of time counts as failed).
set -uo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
ROOT="$(dirname "$(dirname "$SELF")")"
usage() { sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "$SELF"; }

DRY=${PLDR_GPU_CHECK_DRY:-0}
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --dry-run) DRY=1; shift ;;
esac
[ "$DRY" = 1 ] || DRY=0

PY=${PYTHON:-python3}
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # survives cd
export PYTHON="$PY" PYTHONUNBUFFERED=1
# Every step imports this tree's pldr_kernels (scripts in tools/ too), with the binary put in it.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-$([ "$DRY" = 1 ] && echo 2 || echo 16)}
ARCHS=9.0a  # the H200; the carried wheel is built for the same (make cuda-check: H200_ARCHS)

QUICK_FLAG=$([ "${QUICK:-1}" = 1 ] && echo --quick)
bench_runs() {  # calls "$1" NAME ARGS... for each benchmark run: python -m pldr_kernels.bench ARGS
  local each=$1
  $each pldr_bench_ops ops --device cuda $QUICK_FLAG --no-progress --json "$OUT/pldr_bench_ops.json"
  $each pldr_bench_generate generate --device cuda $QUICK_FLAG --no-progress \
    --json "$OUT/pldr_bench_generate.json"
  # Training on the H200 (goal: pldr_kernels' forward + backward within 1.5x of the best SDPA
  # backend on a pre-multiplied query, bf16, d = 64, S >= 2k); the sweep's own shapes.
  $each bench_train_cuda train --device cuda --train-parts g_attention --seqlens 2048 4096 \
    --dtypes bfloat16 --repeats 10 --no-progress --json "$OUT/bench_train_cuda.json"
  [ "${QUICK:-1}" = 1 ] && return 0
  # QUICK=0: the focused sweeps (prefill vs every SDPA backend, decode vs copy bandwidth, metric).
  $each bench_prefill_cuda ops --device cuda --ops g_attention --batch 1 2 4 8 16 \
    --seqlens 1024 2048 4096 8192 --dtypes bfloat16 --contestants pldr_kernels 'sdpa_*' \
    --repeats 30 --no-progress --json "$OUT/bench_prefill_cuda.json"
  $each bench_decode_cuda ops --device cuda --ops g_attention_decode --batch 1 8 \
    --cache-lens 1024 16384 131072 --dtypes bfloat16 --repeats 50 --no-progress \
    --json "$OUT/bench_decode_cuda.json"
  $each bench_metric_cuda ops --device cuda --ops metric_tensors --seqlens 1024 \
    --dtypes bfloat16 float32 --repeats 50 --no-progress --json "$OUT/bench_metric_cuda.json"
}
# Internal entry points, run as their own process so that a step's time limit can stop them.
if [ "${1:-}" = __install ]; then
  cd "$ROOT"
  WHEEL=$(ls -t .whl/pldr_kernels-*.whl 2>/dev/null | head -n 1)
  if [ "${GPU_CHECK_BUILD:-0}" = 1 ]; then
    echo "GPU_CHECK_BUILD=1: building from source"
  elif [ -z "$WHEEL" ]; then
    echo "no carried wheel (.whl/pldr_kernels-*.whl; make cuda-check builds one, carry .whl): building"
  elif "$PY" tools/cuda_wheel.py matches "$WHEEL"; then
    echo wheel > "$2"
    exec "$PY" tools/cuda_wheel.py unpack "$WHEEL"
  else
    echo "so building from source"
  fi
  echo build > "$2"
  # torch takes CUDA_HOME from `which nvcc` when unset, wrong for a wrapper such as /usr/local/bin/nvcc
  if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
  fi
  echo "CUDA_HOME=${CUDA_HOME:-unset (torch looks for nvcc)}, MAX_JOBS=$MAX_JOBS"
  # In place, like `pip install -e .` without touching the Python's packages (ptxas reads this log)
  exec env TORCH_CUDA_ARCH_LIST=$ARCHS PLDR_KERNELS_FORCE_CUDA=1 PLDR_KERNELS_PTXAS_VERBOSE=1 \
    "$PY" setup.py build_ext --inplace
fi
if [ "${1:-}" = __bench_args ]; then  # __bench_args OUTDIR: parse every command of bench_runs
  OUT=$2
  parse_one() {  # the benchmark CLI's own parser and config builders on one command line
    shift
    "$PY" -c '
import sys
from pldr_kernels.bench import __main__ as cli
args = cli.build_parser().parse_args(sys.argv[1:])
if args.suite in ("ops", "all"):
    cli.ops_config(args)
if args.suite in ("generate", "all"):
    cli.generate_config(args)
if args.suite in ("train", "all"):
    cli.train_config(args)
print("parses: python -m pldr_kernels.bench", " ".join(sys.argv[1:]))' "$@" || bad=1
  }
  cd "$ROOT" && bad=0 && bench_runs parse_one
  exit $bad
fi

OUT=${1:?usage: tools/gpu_check.sh [--dry-run] OUTDIR   (--help for more)}
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"

if [ "$DRY" = 1 ] && [ -z "${GPU_CHECK_COPY:-}" ]; then
  # What the device tool sends: tracked and untracked-not-ignored files, and the carried .whl/.
  # Running there also keeps this tree's own build (pldr_kernels/_C*.so) untouched.
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_tree.XXXXXX")
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
     | xargs -0 cp --parents -t "$WORK" && { [ ! -d .whl ] || cp -r .whl "$WORK/"; }) || exit 1
  echo "dry run in $WORK, a copy of the tree as the device tool sends it (with .whl/)"
  GPU_CHECK_COPY=$WORK PYTHON=$PY bash "$WORK/tools/gpu_check.sh" --dry-run "$OUT"
  rc=$?
  rm -rf "$WORK"
  exit $rc
fi

cd "$ROOT"
LOG="$OUT/logs"
rm -rf "$LOG" "$OUT/summary.txt" && mkdir -p "$LOG"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-540}
failed=0

record() {  # record NAME STATUS SECONDS: one line of summary.txt, written as it happens
  printf '%-22s %-60s %5ss\n' "$1" "$2" "$3" | tee -a "$OUT/summary.txt"
}
skip() {  # skip NAME REASON [COMMAND...]
  local name=$1 why=$2; shift 2
  echo "== $name"
  [ $# -eq 0 ] || echo "   would run: $(printf '%q ' "$@")"
  record "$name" "skipped: $why" 0
}
step() {  # step NAME LIMIT_S gpu|cpu CMD...: run CMD (log in logs/NAME.log) within LIMIT_S seconds
  local name=$1 limit=$2 needs=$3; shift 3
  if [ "$needs" = gpu ] && [ "$DRY" = 1 ]; then
    skip "$name" "needs a GPU" "$@"
    return 0
  fi
  local t0 left rc
  t0=$(date +%s)
  left=$(( BUDGET - (t0 - START) - 20 ))  # 20 s for the summary and the tarball
  if [ "$left" -lt 10 ]; then
    record "$name" "FAILED: not started, out of time (GPU_CHECK_BUDGET_S=$BUDGET)" 0
    failed=1
    return 1
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name: $(printf '%q ' "$@")"
  timeout -k 10 "$limit" "$@" > "$LOG/$name.log" 2>&1
  rc=$?
  tail -n 8 "$LOG/$name.log" | sed 's/^/   /'
  if [ $rc -eq 0 ]; then
    record "$name" passed $(( $(date +%s) - t0 ))
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    record "$name" "FAILED: stopped after ${limit}s" $(( $(date +%s) - t0 ))
    failed=1
  else
    record "$name" "FAILED (exit $rc; logs/$name.log)" $(( $(date +%s) - t0 ))
    failed=1
  fi
  return $rc
}
finish() {
  trap - INT TERM
  local n_pass n_fail n_skip
  n_pass=$(grep -c ' passed ' "$OUT/summary.txt")
  n_fail=$(grep -c ' FAILED' "$OUT/summary.txt")
  n_skip=$(grep -c ' skipped: ' "$OUT/summary.txt")
  echo "$([ "$DRY" = 1 ] && echo 'dry run: ')$n_pass passed, $n_fail failed, $n_skip skipped in \
$(( $(date +%s) - START ))s" | tee -a "$OUT/summary.txt"
  echo; cat "$OUT/summary.txt"
  tar czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOG"
  exit $failed
}
trap 'record interrupted "FAILED: the script was stopped" 0; failed=1; finish' INT TERM

bench_run() { local name=$1; shift; step "$name" 240 gpu "$PY" -m pldr_kernels.bench "$@"; }

echo "gpu_check: $([ "$DRY" = 1 ] && echo 'dry run, ')python $PY, MAX_JOBS=$MAX_JOBS, budget ${BUDGET}s"
echo "  $("$PY" -c 'import sys, torch; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}")' 2>&1)"
step gpu-info 30 gpu nvidia-smi

# Steps that need no GPU first: a broken script or tree shows in seconds, before any GPU time.
step install 420 cpu bash "$SELF" __install "$LOG/install-mode"
if [ "$(cat "$LOG/install-mode" 2>/dev/null)" = build ]; then
  step ptxas 30 cpu "$PY" tools/check_ptxas.py "$LOG/install.log"
else
  skip ptxas "the carried wheel is used (make cuda-check checked its ptxas report)"
fi
step verify 60 cpu "$PY" tools/cuda_wheel.py verify --archs "$ARCHS"
step tests-collect 90 cpu "$PY" -m pytest --collect-only -q -m "not emulation" tests
step sanitize-case-cpu 120 cpu "$PY" tools/sanitize_case.py --device cpu
step bench-args 60 cpu bash "$SELF" __bench_args "$OUT"
# GPU steps
step tests 300 gpu "$PY" -m pytest -q -ra -m "not emulation" tests \
  --ignore=tests/test_triton_attention.py
# The Triton kernels (docs/design.md §3.7) on their own: each kernel variant JIT-compiles at its
# first launch, so this step's time is mostly compilation.
step triton-tests 240 gpu "$PY" -m pytest -q -ra tests/test_triton_attention.py
step memcheck 150 gpu compute-sanitizer --tool memcheck --error-exitcode 1 \
  "$PY" tools/sanitize_case.py --device cuda
step racecheck 240 gpu compute-sanitizer --tool racecheck --error-exitcode 1 \
  "$PY" tools/sanitize_case.py --device cuda
bench_runs bench_run
finish
