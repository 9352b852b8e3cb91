#!/usr/bin/env bash
# One device call (target: under 9 minutes on an H100): install (builds the CUDA reference
# for sm_75/80/90), then the nvcc compile test, the CUDA reference tests, the GPU parity
# suite with the determinism tests, and the reference's speed at N = 4096.
# Usage, from the repo root on the GPU machine:  bash scripts/device_parity.sh
# Logs under $OUT (default results_tmp): install.log, parity.log, cuda_reference_speed.md.
set -uo pipefail
OUT=${OUT:-results_tmp}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export FLASHTILE_AUTOTUNE=0   # parity is about numerics: one config per kernel, one compile each
export TRITON_INTERPRET=0
start=$SECONDS
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== pip install -e . --no-build-isolation (FLASHTILE_BUILD_EXTENSION=1: a failed build is an error)"
FLASHTILE_BUILD_EXTENSION=1 MAX_JOBS=${MAX_JOBS:-16} \
  python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1
rc=$?
tail -3 "$OUT/install.log"
echo "== install: rc=$rc, $((SECONDS - start)) s"
python3 -c "import torch, flashtile.cuda_reference as r; print('torch', torch.__version__, '| extension built:', r.is_built(), '| with CUDA:', r.built_with_cuda())"
[[ $rc -eq 0 ]] || exit $rc

# pytest-xdist, where installed, runs 4 workers: each compiles other cases' kernels.
xdist=()
if python3 -c "import xdist" 2>/dev/null; then xdist=(-n "${WORKERS:-4}" --dist loadgroup); fi
t0=$SECONDS
python3 -m pytest -q -ra "${xdist[@]}" --durations=15 \
  tests/test_nvcc_compile.py tests/test_cuda_reference.py tests/test_parity.py 2>&1 | tee "$OUT/parity.log"
status=${PIPESTATUS[0]}
echo "== tests: rc=$status, $((SECONDS - t0)) s" | tee -a "$OUT/parity.log"

timeout 120 python3 scripts/cuda_reference_speed.py 2>&1 | tee "$OUT/cuda_reference_speed.md"
echo "== device_parity.sh took $((SECONDS - start)) s"
exit $status
