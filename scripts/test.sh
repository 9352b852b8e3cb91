#!/usr/bin/env bash
# flashtile's test command, set-up included. From a clone, on any Linux machine:
#
#     bash scripts/test.sh [extra pytest arguments for every pass]
#
# Set-up: where python3 already imports torch (a GPU machine's CUDA build), flashtile is
# installed into that Python without network (`pip install --no-build-isolation --no-deps -e .`,
# which also builds the CUDA reference ahead of time; test tools only if missing). Otherwise a
# virtual environment .venv is made in the clone with PyTorch 2.13.0's CPU wheel, then
# `pip install -e ".[test,bench]"` as a user would (the CUDA reference compiles on first use).
#
# Then up to three pytest passes, because a Triton process either interprets or compiles:
#   1. pytest -m "not aot" (TRITON_INTERPRET=1): plain pytest's tests (every kernel on the CPU
#      interpreter at small odd shapes against float64, the interface's errors, the tolerance
#      rule, the property test, the CUDA reference's host build) and the extra builds of the
#      CUDA reference that plain pytest leaves out (nvcc for each target, -static-libstdc++).
#   2. pytest -m aot, TRITON_INTERPRET=0: every shipped kernel variant compiled ahead of time
#      for sm_75, sm_80 and sm_90 (no GPU needed), on every core with pytest-xdist.
#   3. Only where CUDA is available: the GPU tests (pytest -m gpu) at real shapes.
# Tests that cannot run in a pass are skipped there with their reason, never counted as passed.
# Exits non-zero if any pass fails or a pass runs no test.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
start=$SECONDS

if python3 -c "import torch" 2>/dev/null && [[ ! -x .venv/bin/python ]]; then
  python=python3
  echo "== using $(python3 -c 'import sys, torch; print(sys.executable, "torch", torch.__version__)')"
  $python -c "import pytest, hypothesis" 2>/dev/null || $python -m pip install -q pytest hypothesis
  $python -m pip install -q --no-build-isolation --no-deps -e . || exit 1
else
  if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv || exit 1
  fi
  python=.venv/bin/python
  echo "== installing into .venv (PyTorch 2.13.0 CPU wheel, then flashtile[test])"
  $python -m pip install -q --upgrade "setuptools>=64" wheel || exit 1
  # torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
  $python -m pip install -q "torch==2.13.0" || exit 1
  $python -m pip install -q -e ".[test,bench]" || exit 1
fi
$python -c "import torch, triton, flashtile; print('torch', torch.__version__, '| triton', triton.__version__, '| flashtile', flashtile.__version__, '| cuda', torch.cuda.is_available())" || exit 1
echo "== set-up took $((SECONDS - start)) s"

failed=()
run_pass() {  # run_pass NAME ENV-ASSIGNMENT PYTEST-ARGS...
  local name=$1 env=$2; shift 2
  local pass_start=$SECONDS
  echo
  echo "== pass $name: $env python -m pytest $*"
  env "$env" "$python" -m pytest "$@"
  local status=$?
  echo "== pass $name: exit $status in $((SECONDS - pass_start)) s"
  # 5 is pytest's "no tests ran": a pass that runs nothing is a failure, not a success.
  [[ $status -eq 0 ]] || failed+=("$name (exit $status)")
}

xdist=()
if $python -c "import xdist" 2>/dev/null; then xdist=(-n "$(nproc)"); fi
run_pass interpreter TRITON_INTERPRET=1 -q -ra -m "not aot" tests "$@"
# AOT_TARGETS=75,80 compiles for those targets only (CI: the full sweep takes over 20 minutes
# on 2 cores); default every target.
aot_only=()
if [[ -n ${AOT_TARGETS:-} ]]; then
  aot_only=(-k "sm${AOT_TARGETS//,/ or sm} or covered")
  echo
  echo "== AOT_TARGETS=$AOT_TARGETS: the ahead-of-time pass compiles for these targets only"
fi
run_pass aot-compile TRITON_INTERPRET=0 -q -ra -m aot "${xdist[@]}" "${aot_only[@]}" tests "$@"
if $python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  run_pass gpu TRITON_INTERPRET=0 -q -ra -m gpu tests "$@"
else
  echo
  echo "== pass gpu: not run, no CUDA device (the GPU tests were reported as skipped above)"
fi

echo
echo "== total $((SECONDS - start)) s"
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all passes succeeded"
