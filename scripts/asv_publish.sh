#!/usr/bin/env bash
# Publish the committed asv history as a static site: asv_bench/html/index.html (git-ignored).
#
#   bash scripts/asv_publish.sh            # then open asv_bench/html/index.html, or:
#   cd asv_bench && python -m asv preview  # serves it on http://127.0.0.1:8080
#
# Needs asv (pip install asv) and this checkout's .git (asv reads commit dates and order
# from it); no GPU. Extra arguments go to `asv publish`.
set -euo pipefail
python=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')  # absolute, before the cd
cd "$(dirname "$0")/../asv_bench"
"$python" -m asv publish "$@"
echo "published: $(pwd)/html/index.html"
