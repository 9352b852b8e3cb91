#!/usr/bin/env bash
# The benchmark, set-up included: on a machine with an NVIDIA GPU, from the repo root,
#     bash scripts/bench.sh [flashtile.bench options, e.g. --dtypes fp16,bf16 --out results/h100]
# Uses the python3 that has a CUDA build of PyTorch (installs one, with Triton 3.6, if torch
# is missing), installs flashtile from this checkout, and runs python -m flashtile.bench.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if ! python3 -c "import torch" 2>/dev/null; then
  python3 -m pip install -q torch "triton>=3.6,<3.7"
fi
python3 -c "import triton" 2>/dev/null || python3 -m pip install -q "triton>=3.6,<3.7"
python3 -m pip install -q --no-build-isolation --no-deps -e .
python3 -m flashtile.bench "$@"
