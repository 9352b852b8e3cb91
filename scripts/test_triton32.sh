#!/usr/bin/env bash
# flashtile under Triton 3.2, the last Triton that uses Turing's (T4's) tensor cores. CI runs
# it after scripts/test.sh; it needs pip access (the CPU machine), no GPU:
#
#     bash scripts/test_triton32.sh [--full]
#
# Set-up: a second virtual environment .venv-triton32 with PyTorch 2.13.0's CPU wheel (which
# does not depend on Triton) and triton==3.2.0; flashtile is imported from the clone (with
# the CUDA reference's host build that scripts/test.sh compiled there for the same torch).
# Then two passes:
#   1. python -m flashtile.aot --arch sm_75 --require-tensor-cores --sample: every kernel
#      and launch config shipped for sm_75 compiles with mma instructions within 64 KB of
#      shared memory (--full: all 510 sm_75 variants, about 9x longer).
#   2. TRITON_INTERPRET=1: the test files that run the Triton kernels (kernels at odd shapes,
#      the parity suite, the interface). 3.2's interpreter runs all of them, given the fixes
#      in flashtile/triton_kernels/_interpreter_fix.py. Left to scripts/test.sh: the CUDA
#      reference, the tolerance rule, asv and the benchmark command, which do not depend on
#      the Triton version (the benchmark runs the same kernels, for two minutes more).
# Exits non-zero if either pass fails.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS
sample=--sample
[[ "${1:-}" == "--full" ]] && sample=

python=.venv-triton32/bin/python
if [[ ! -x $python ]]; then
  python3 -m venv .venv-triton32 || exit 1
fi
echo "== installing into .venv-triton32 (PyTorch 2.13.0 CPU wheel, triton 3.2.0)"
$python -m pip install -q "torch==2.13.0" "triton==3.2.0" numpy pytest hypothesis || exit 1
# The files that run Triton kernels; the CUDA reference (impl="cuda") and the property test do
# not depend on Triton's version and run in the main pass.
kernel_tests=(tests/test_parity.py tests/test_interface.py)
not_here="not cuda and not property"
$python -c "import sys, torch, triton; print('torch', torch.__version__, '| triton', triton.__version__); \
sys.exit(0 if triton.__version__.startswith('3.2.') else 'expected triton 3.2.x')" || exit 1
echo "== set-up took $((SECONDS - start)) s"

failed=()
pass_start=$SECONDS
echo
echo "== pass aot-sm75-triton32: python -m flashtile.aot --arch sm_75 --require-tensor-cores $sample"
TRITON_INTERPRET=0 $python -m flashtile.aot --arch sm_75 --require-tensor-cores $sample --quiet --jobs "$(nproc)" \
  || failed+=(aot-sm75-triton32)
echo "== pass aot-sm75-triton32: $((SECONDS - pass_start)) s"

pass_start=$SECONDS
echo
echo "== pass interpreter-triton32: TRITON_INTERPRET=1 python -m pytest -q -ra -k '$not_here' ${kernel_tests[*]}"
TRITON_INTERPRET=1 $python -m pytest -q -ra -p no:cacheprovider -k "$not_here" "${kernel_tests[@]}" \
  || failed+=(interpreter-triton32)
echo "== pass interpreter-triton32: $((SECONDS - pass_start)) s"

echo
echo "== triton 3.2 total $((SECONDS - start)) s"
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all triton 3.2 passes succeeded"
