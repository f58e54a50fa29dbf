#!/usr/bin/env bash
# One run on the H200 (DESIGN.md §5.4): build, CUDA tests, compute-sanitizer (memcheck, racecheck)
# on small cases, and the GPU benchmarks. Leaves summary.txt, the benchmark JSON files and
# logs.tar.gz in OUTDIR (the device tool returns at most 8 files).
#   usage: tools/gpu_check.sh OUTDIR        (env: PYTHON, SKIP_BUILD=1, QUICK=1)
set -uo pipefail
OUT=${1:?usage: tools/gpu_check.sh OUTDIR}
PY=${PYTHON:-python3}
LOG="$OUT/logs"
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

status=0
step() {  # step NAME CMD...: run, log to logs/NAME.log, record rc and seconds in summary.txt
  local name=$1; shift
  local t0=$(date +%s)
  echo "== $name: $*"
  "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt"
  tail -n 8 "$LOG/$name.log"
  [ $rc -eq 0 ] || status=1
  return $rc
}
finish() {
  tar czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOG"
  exit $status
}

nvidia-smi > "$LOG/nvidia-smi.txt" 2>&1
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  step build env TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 PLDR_KERNELS_FORCE_CUDA=1 \
    PLDR_KERNELS_PTXAS_VERBOSE=1 "$PY" -m pip install --no-build-isolation --no-deps -e . || finish
  step ptxas "$PY" tools/check_ptxas.py "$LOG/build.log"
fi
step report "$PY" -m pldr_kernels
step tests "$PY" -m pytest -q -ra -m "not emulation" tests
step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" tools/sanitize_case.py
step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 "$PY" tools/sanitize_case.py
for b in benchmarks/bench_attention_cuda.py benchmarks/bench_decode_metric_cuda.py; do
  [ -f "$b" ] && step "$(basename "$b" .py)" "$PY" "$b" --json "$OUT/$(basename "$b" .py).json"
done
QUICK_FLAG=$([ "${QUICK:-1}" = 1 ] && echo --quick)
step pldr_bench_ops "$PY" -m pldr_kernels.bench ops --device cuda $QUICK_FLAG --json "$OUT/pldr_bench_ops.json"
step pldr_bench_generate "$PY" -m pldr_kernels.bench generate --device cuda $QUICK_FLAG \
  --json "$OUT/pldr_bench_generate.json"
finish
