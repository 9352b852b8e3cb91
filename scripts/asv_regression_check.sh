#!/usr/bin/env bash
# The regression check: exits 1 if any benchmark of NEW is more than 10% slower than BASE's.
#
#   bash scripts/asv_regression_check.sh BASE NEW [--machine h100] [--factor 1.1] [--all]
#
# BASE and NEW: commits (any name git resolves here, e.g. a short hash or HEAD~1) that both
# have results in asv_bench/results/MACHINE/ (scripts/asv_record.sh records them). Prints
# `asv compare --split --factor F` first when asv is installed (the familiar view; its
# "worse" marks read every increase as worse, TFLOP/s included), then the decisive table of
# scripts/asv_regression_check.py: slower = longer time_*, or fewer TFLOP/s in track_*tflops.
# Exit status: 0 none slower, 1 some slower, 2 usage error (no results for a commit).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 2 ]]; then sed -n 2,12p "$0"; exit 2; fi
resolve() { git rev-parse --verify --quiet "$1^{commit}" 2>/dev/null || echo "$1"; }
base=$(resolve "$1") new=$(resolve "$2"); shift 2
machine=h100 factor=1.1
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --machine) machine=${args[i+1]} ;;
    --factor) factor=${args[i+1]} ;;
  esac
done
PYTHON=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')
if "$PYTHON" -c "import asv" 2>/dev/null && git rev-parse --git-dir >/dev/null 2>&1; then
  echo "== asv compare --split --factor $factor --machine $machine ${base:0:8} ${new:0:8}"
  "$PYTHON" -m asv compare --split --factor "$factor" --machine "$machine" "$base" "$new" || true
  echo
fi
echo "== scripts/asv_regression_check.py"
exec "$PYTHON" scripts/asv_regression_check.py "$base" "$new" "$@"
