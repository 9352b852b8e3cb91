#!/usr/bin/env bash
# The benchmark, set-up included. From the repo root, in the Python environment to measure
# (PyTorch installed: its CUDA build on a GPU machine):
#
#     bash scripts/bench.sh [python -m flashtile.bench options, e.g. --quick, --dtypes fp16 --out DIR]
#
# Installs flashtile from this checkout with its bench extra (`pip install -e ".[bench]"`:
# the runtime dependencies from flashtile's own metadata, plus matplotlib, tqdm and asv),
# offline when everything is already installed; then runs python -m flashtile.bench. The CUDA
# reference compiles on first use, for this machine's GPU only. PYTHON picks the interpreter
# (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
python=${PYTHON:-python3}
if ! "$python" -c "import torch" 2>/dev/null; then
  echo "bench.sh: $python has no torch; pip installs the index's default build (install the CPU or CUDA build first to choose)" >&2
fi
# Offline first: succeeds when every requirement is already there (a machine without network).
if ! FLASHTILE_BUILD_EXTENSION=0 "$python" -m pip install -q --no-index --no-build-isolation -e ".[bench]" 2>/dev/null; then
  "$python" -m pip install -q -e ".[bench]"
fi
exec "$python" -m flashtile.bench "$@"
