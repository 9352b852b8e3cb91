#!/usr/bin/env bash
# One device call: install offline, GPU parity smoke, GPU test suite, benchmark.
# Usage on the GPU machine, from the repo root:  bash scripts/device_run.sh [smoke|tests|bench|all]
# Writes logs and bench JSON under $OUT (default ./results_tmp).
set -uo pipefail
OUT=${OUT:-results_tmp}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
what=${1:-all}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -2
python3 -c "import flashtile, torch, triton; print('flashtile', flashtile.__version__, 'torch', torch.__version__, 'triton', triton.__version__)"
status=0
if [[ $what == smoke || $what == all ]]; then
  python3 scripts/gpu_smoke.py 2>&1 | tee "$OUT/smoke.log" || status=1
fi
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -ra -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" || status=1
fi
if [[ $what == bench || $what == all ]]; then
  python3 -m flashtile.bench ${BENCH_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/bench.log" || status=1
fi
exit $status
