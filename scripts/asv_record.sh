#!/usr/bin/env bash
# Record asv results for a range of commits, in the Python that is already installed (asv's
# "existing" environment: nothing is built or downloaded by asv).
#
#   bash scripts/asv_record.sh [options] [COMMIT ...]
#
# For each commit (oldest first): `git archive` it from the mirror, pip-install it (no deps,
# no build isolation) into a temporary directory, compile its Triton kernels in parallel
# (asv_bench/benchmarks/attention.py: precompile), then run the current tree's suite with
# `asv run --set-commit-hash COMMIT`, so the result is stored under that commit's hash in
# asv_bench/results/MACHINE/.
#
# Options:
#   --mirror DIR      a git repository (bare is fine) holding the commits; default: this checkout
#   --machine NAME    asv machine name: results land in RESULTS/NAME/. Default: the GPU's model
#                     ("NVIDIA H100 80GB HBM3" -> h100), or cpu-HOSTNAME without CUDA (the tiny
#                     CPU grid). A NAME whose machine.json names another GPU is refused: one
#                     machine's history never receives another's results.
#   --results DIR     default asv_bench/results
#   --skip-existing   skip a commit that already has a result file for this machine (to resume)
#   --jobs N          parallel compile workers (default 8; 0 skips precompiling)
#   --budget SECONDS  start no further commit once SECONDS have passed or the slowest commit so
#                     far would not fit before then (rerun with --skip-existing to go on)
#   COMMIT ...        default: every commit of main that touches a kernel, i.e.
#                     git log --reverse main -- flashtile/triton_kernels cuda_reference
# Environment: ASV_RUN_ARGS adds `asv run` options. PYTHON (default python3) must have torch,
# triton and asv importable (PYTHONPATH is passed on to the benchmarks). TORCH_CUDA_ARCH_LIST
# defaults to 9.0 (the H100) so that a commit with the CUDA reference builds it for one arch.
set -euo pipefail
cd "$(dirname "$0")/.."
repo_root=$PWD

mirror="" machine="" results=asv_bench/results skip_existing=0 jobs=8 budget=0
commits=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --mirror) mirror=$2; shift 2 ;;
    --machine) machine=$2; shift 2 ;;
    --results) results=$2; shift 2 ;;
    --skip-existing) skip_existing=1; shift ;;
    --jobs) jobs=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    -h|--help) sed -n 2,27p "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) commits+=("$1"); shift ;;
  esac
done
if [[ -z $mirror ]]; then mirror=$(git rev-parse --git-dir); fi
mirror=$(cd "$mirror" && pwd)
mkdir -p "$results"
results=$(cd "$results" && pwd)
py_exe=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')
PYTHON=$py_exe
git_m() { git --git-dir "$mirror" "$@"; }

gpu=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' 2>/dev/null || true)
if [[ -z $gpu ]]; then echo "torch is not importable by $PYTHON" >&2; exit 2; fi
if [[ -z $machine ]]; then
  if [[ $gpu == "no GPU" ]]; then
    machine=cpu-$(hostname -s)
  else  # the first word of the model name with a digit in it: "NVIDIA H100 80GB HBM3" -> h100
    machine=$(echo "${gpu#NVIDIA }" | awk '{for (i = 1; i <= NF; i++) if ($i ~ /[0-9]/) {print tolower($i); exit}}')
    machine=${machine:-gpu-$(hostname -s)}
  fi
fi
recorded_gpu=$("$PYTHON" -c 'import json, sys
try:
    print(json.load(open(sys.argv[1]))["cpu"].split(";")[0].removeprefix("GPU: "))
except FileNotFoundError:
    pass' "$results/$machine/machine.json") || exit 2
if [[ -n $recorded_gpu && $recorded_gpu != "$gpu" ]]; then
  echo "$results/$machine/ holds the results of another machine (GPU: $recorded_gpu; this one: $gpu): pass --machine NAME" >&2
  exit 2
fi
if [[ $gpu == "no GPU" ]]; then jobs=0; fi  # the tiny CPU grid runs on the interpreter: nothing to compile

if [[ ${#commits[@]} -eq 0 ]]; then
  mapfile -t commits < <(git_m log --format=%H --reverse main -- flashtile/triton_kernels cuda_reference)
fi
full=()
for c in "${commits[@]}"; do full+=("$(git_m rev-parse --verify "$c^{commit}")"); done
echo "== ${#full[@]} commit(s) to record on machine '$machine' from $mirror:"
for c in "${full[@]}"; do echo "   $(git_m log -1 --format='%h %ad %s' --date=short "$c" | cut -c1-100)"; done

export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The committed asv.conf.json with absolute paths: the mirror as the repo, this tree's suite.
"$PYTHON" - "$repo_root/asv.conf.json" "$work/asv.conf.json" "$mirror" "$results" "$work/env" <<'EOF'
import json, os, sys
source, target, mirror, results, env_dir = sys.argv[1:]
conf = json.load(open(source))
here = os.path.dirname(os.path.abspath(source))
conf.update(repo=mirror, results_dir=results, env_dir=env_dir,
            benchmark_dir=os.path.join(here, conf["benchmark_dir"]), html_dir=os.path.join(here, conf["html_dir"]))
# The overlay environment plugin is for plain `asv run`; this script runs asv's "existing" one,
# and from $work the plugin's module (asv_bench, beside the committed config) is not importable.
conf.pop("plugins", None)
json.dump(conf, open(target, "w"), indent=1)
EOF
asv() { (cd "$work" && "$PYTHON" -m asv --config "$work/asv.conf.json" "$@"); }

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || uname -m)
ram=$(awk '/MemTotal/ {printf "%.0fGB", $2 / 1048576}' /proc/meminfo)
asv machine --yes --machine "$machine" --os "$(uname -sr)" --arch "$(uname -m)" \
  --cpu "GPU: $gpu; CPU: $cpu" --num_cpu "$(nproc)" --ram "$ram" >/dev/null

status=0 slowest=0 left=()
for c in "${full[@]}"; do
  short=${c:0:8}
  if [[ $skip_existing == 1 ]] && compgen -G "$results/$machine/$short-*.json" >/dev/null; then
    echo "== $short: already recorded, skipped"; continue
  fi
  if [[ $budget -gt 0 && $((SECONDS + slowest)) -gt $budget ]]; then
    left+=("$short"); continue
  fi
  start=$SECONDS
  echo "== $short: $(git_m log -1 --format=%s "$c" | cut -c1-90)"
  rm -rf "$work/src" "$work/site"; mkdir -p "$work/src"
  git_m archive "$c" | tar -x -C "$work/src"
  # The CUDA reference's extension is built once per version of its sources, not per commit.
  ext_key=""
  if git_m cat-file -e "$c:cuda_reference" 2>/dev/null; then
    ext_key=$(git_m rev-parse "$c:cuda_reference")-$(git_m rev-parse --verify --quiet "$c:bindings" || echo none)
  fi
  ext_cached=""
  if [[ -n $ext_key ]] && compgen -G "$work/ext/$ext_key/*.so" >/dev/null; then ext_cached=$work/ext/$ext_key; fi
  if ! FLASHTILE_BUILD_EXTENSION=${ext_cached:+0} "$PYTHON" -m pip install -q --no-deps --no-build-isolation \
        --no-warn-script-location --target "$work/site" "$work/src" >"$work/pip.log" 2>&1; then
    echo "   pip install failed:"; tail -20 "$work/pip.log"; status=1; continue
  fi
  if [[ -n $ext_cached ]]; then
    cp "$ext_cached"/*.so "$work/site/flashtile/"; echo "   CUDA reference extension reused from an earlier commit"
  elif [[ -n $ext_key ]] && compgen -G "$work/site/flashtile/_cuda_reference*.so" >/dev/null; then
    mkdir -p "$work/ext/$ext_key"; cp "$work"/site/flashtile/_cuda_reference*.so "$work/ext/$ext_key/"
  fi
  grep -i "warning: building" "$work/pip.log" | head -3 || true
  export ASV_PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
  echo "   installed in $((SECONDS - start)) s"
  if [[ $jobs -gt 0 ]]; then
    PYTHONPATH=$ASV_PYTHONPATH "$PYTHON" -c "import sys; sys.path.insert(0, '$repo_root/asv_bench/benchmarks'); \
import attention; attention.precompile($jobs)" || echo "   (precompile failed; asv compiles serially)"
    echo "   precompiled at $((SECONDS - start)) s"
  fi
  # shellcheck disable=SC2086  # ASV_RUN_ARGS: extra `asv run` options, e.g. "--durations 10 -b Timing"
  if ! asv run -E "existing:$py_exe" --set-commit-hash "$c" --machine "$machine" --show-stderr ${ASV_RUN_ARGS:-}; then
    echo "   asv run failed for $short"; status=1
  fi
  if ! compgen -G "$results/$machine/$short-*.json" >/dev/null; then
    echo "   no result file for $short"; status=1
  fi
  echo "== $short: done in $((SECONDS - start)) s"
  if [[ $((SECONDS - start)) -gt $slowest ]]; then slowest=$((SECONDS - start)); fi
done
if [[ ${#left[@]} -gt 0 ]]; then
  echo "== out of budget (${budget} s) after $SECONDS s; not recorded yet: ${left[*]} (rerun with --skip-existing)"
  [[ $status == 0 ]] && status=3
fi
echo "== total $SECONDS s"
exit $status
