#!/usr/bin/env bash
# Publish the recorded asv history as a static site: asv_bench/html/index.html (git-ignored).
#
#   bash scripts/asv_publish.sh            # then open asv_bench/html/index.html, or:
#   python -m asv preview                  # from the repo root: serves it on http://127.0.0.1:8080
#
# Needs asv (pip install -e ".[bench]") and this checkout's .git (asv reads commit dates and
# order from it); no GPU. Extra arguments go to `asv publish`.
set -euo pipefail
python=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')
cd "$(dirname "$0")/.."
"$python" -m asv publish "$@"
echo "published: $(pwd)/asv_bench/html/index.html"
