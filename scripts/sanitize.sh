#!/usr/bin/env bash
# compute-sanitizer on the GPU (one device call, a few minutes):
#   memcheck            the CUDA reference and the Triton kernels (v1, v2, v2_atomic)
#   racecheck, initcheck the CUDA reference
# each on forward + backward at small odd shapes (scripts/sanitize_target.py).
# Usage, from the repo root on the GPU machine:  bash scripts/sanitize.sh
# Logs under $OUT/sanitize (default results_tmp/sanitize); summary.txt has one line per run
# (compute-sanitizer's "ERROR SUMMARY"). Exits non-zero if any run reports an error.
set -uo pipefail
OUT=${OUT:-results_tmp}
LOGS="$OUT/sanitize"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
export FLASHTILE_AUTOTUNE=0               # one config per kernel: one compile, not four
export PYTORCH_NO_CUDA_MEMORY_CACHING=1   # every tensor its own cudaMalloc: memcheck sees its bounds
export TRITON_INTERPRET=0
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
"$SAN" --version | tail -1 | tee "$LOGS/version.txt"
start=$SECONDS

if ! python3 -c "import flashtile.cuda_reference as r, sys; sys.exit(0 if r.built_with_cuda() else 1)" 2>/dev/null; then
  echo "== installing (builds the CUDA reference)"
  FLASHTILE_BUILD_EXTENSION=1 python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
fi
# Compile the Triton kernels once outside the sanitizer (the cache serves the runs below).
python3 scripts/sanitize_target.py all > "$LOGS/warmup.log" 2>&1 || { echo "warm-up failed"; tail "$LOGS/warmup.log"; }

status=0
: > "$LOGS/summary.txt"
sanitize() {  # name, tool, target, extra options...
  local name=$1 tool=$2 target=$3
  shift 3
  local t0=$SECONDS
  "$SAN" --tool "$tool" --error-exitcode 99 "$@" python3 scripts/sanitize_target.py "$target" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local summary
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOGS/$name.log" | tail -1)
  local done_line
  done_line=$(grep -c "sanitize target done" "$LOGS/$name.log")
  echo "$name: rc=$rc, target finished=$done_line, $((SECONDS - t0)) s: ${summary:-no summary line}" | tee -a "$LOGS/summary.txt"
  [[ $rc -eq 0 && $done_line -eq 1 ]] || status=1
}
sanitize memcheck_all memcheck all
sanitize racecheck_cuda racecheck cuda --racecheck-report all
sanitize initcheck_cuda initcheck cuda
echo "== sanitize.sh took $((SECONDS - start)) s, status $status" | tee -a "$LOGS/summary.txt"
exit $status
